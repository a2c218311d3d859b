import pickle

import pytest
import torch

from dd2cli.errors import CheckpointMismatchError, FileFormatError
from dd2cli.files import (
    check_state_dict,
    load_foreign_checkpoint,
    load_safetensors,
    load_state_dict_strict,
    read_json,
    save_safetensors,
    write_json,
)


def test_safetensors_roundtrip_with_metadata(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16()}
    save_safetensors(tmp_path / "w.safetensors", t, {"step": 7})
    back, meta = load_safetensors(tmp_path / "w.safetensors")
    assert meta == {"step": "7", "format": "pt"}
    for k in t:
        assert torch.equal(back[k], t[k])
    assert not list(tmp_path.glob("*.tmp"))


def test_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
        write_json(tmp_path / "w.json", {"a": 1})
    finally:
        os.umask(umask)
    for name in ("w.safetensors", "w.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_safetensors_header_says_pt_and_keeps_dd2s_own_format_beside_it(tmp_path):
    from safetensors import safe_open

    save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)}, {"format": "dd2-generator-bundle"})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:  # what the ecosystem's loaders read
        header = fh.metadata()
    assert header["format"] == "pt" and header["dd2_format"] == "dd2-generator-bundle"


def test_truncated_and_corrupted_safetensors_are_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated or corrupted"):
        load_safetensors(path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="corrupted"):
        load_safetensors(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(FileFormatError):
        load_safetensors(path)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json(path, {"v": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"v": 2})
    monkeypatch.undo()
    assert read_json(path) == {"v": 1}
    assert not list(tmp_path.glob(".*tmp"))


def test_read_json_damaged(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{oops")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_json(p)


def test_foreign_checkpoint_unwrap_and_weights_only(tmp_path):
    sd = {"w": torch.randn(2, 2), "b": torch.zeros(2)}
    torch.save({"model": sd, "steps": 5}, tmp_path / "wrapped.pt")
    torch.save(sd, tmp_path / "bare.pth")
    assert set(load_foreign_checkpoint(tmp_path / "wrapped.pt")) == {"w", "b"}
    assert set(load_foreign_checkpoint(tmp_path / "bare.pth", unwrap=())) == {"w", "b"}
    with pytest.raises(FileFormatError, match="not a flat state dict"):
        load_foreign_checkpoint(tmp_path / "wrapped.pt", unwrap=())


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_is_not_plain_weights_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(FileFormatError, match="not a plain-weights"):
        load_foreign_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"elephant: not a checkpoint\n" * 20, "is not a"),
    (bytes(range(256)) * 8, "is not a"),
    (b"PK\x03\x04" + bytes(100), "is not a"),  # the start of a zip, then nothing
])
def test_garbage_weight_files_are_one_sentence(tmp_path, content, message):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(FileFormatError) as info:
        load_foreign_checkpoint(path)
    text = str(info.value)
    assert message in text and "arbitrary code" not in text and text.count(". ") == 0 and text.endswith(".")
    torch.save({"model": {"w": torch.ones(1)}, "obj": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(FileFormatError, match="not a plain-weights"):
        load_foreign_checkpoint(tmp_path / "evil2.pt")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(FileFormatError):
        load_foreign_checkpoint(tmp_path / "trunc.pth")


def test_strict_matching_names_the_first_bad_key():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = m.state_dict()
    load_state_dict_strict(m, dict(sd), variant="toy")
    missing = {k: v for k, v in sd.items() if k != "1.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"'1\.bias' is missing.*toy"):
        check_state_dict(m, missing, variant="toy")
    with pytest.raises(CheckpointMismatchError, match=r"Unexpected key 'extra'"):
        check_state_dict(m, {**sd, "extra": torch.ones(1)}, variant="toy")
    bad = dict(sd)
    bad["0.weight"] = torch.ones(4, 2)
    with pytest.raises(CheckpointMismatchError, match=r"'0\.weight'.*\(4, 2\).*\(3, 2\)"):
        check_state_dict(m, bad, variant="toy")


def test_final_stage1_checkpoint_appears_with_its_mark(tmp_path, monkeypatch):
    """The end of stage 1 is marked inside the checkpoint before it becomes visible: another rank (or a resume
    after a kill) that sees the checkpoint folder also sees the mark, and stage 2 starts from it."""
    import os

    from dd2cli.engine import checkpoint
    from dd2cli.engine.checkpoint import final_stage1_checkpoint, save_checkpoint

    seen = []
    real_replace = os.replace

    def replace(src, dst):  # (os.replace also moves the files into the folder: look at folders only)
        if os.path.isdir(src):
            seen.append(sorted(p.name for p in os.scandir(src)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path, 1, 3, {"model": model}, {"model": opt}, {}, {}, keep=1)
    assert final_stage1_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, 1, 4, {"model": model}, {"model": opt}, {}, {}, keep=1, final=True)
    assert "FINAL" in seen[-1] and "FINAL" not in seen[0]
    assert final_stage1_checkpoint(tmp_path).path == path
    save_checkpoint(tmp_path, 2, 1, {"generator": model}, {"generator": opt}, {}, {}, keep=1)
    save_checkpoint(tmp_path, 1, 5, {"model": model}, {"model": opt}, {}, {}, keep=1)
    assert path.is_dir()  # pruning keeps the final stage-1 checkpoint
