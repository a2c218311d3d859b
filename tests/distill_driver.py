"""Run the dd2 CLI in a subprocess with the synthetic test teacher registered.

    python tests/distill_driver.py distill --teacher synthetic-corr ...

Used by the SIGKILL-resume and the 2-process (torchrun, gloo) tests. With DD2_TEST_RECORD=DIR, every
rank records the batches it trains on and a checksum of its final generator in DIR/rank{r}.json.
With DD2_TEST_KILL_INSIDE=FOLDER:FILE (e.g. `stage2-0000004:optim.safetensors`) the process SIGKILLs itself in
the middle of that checkpoint's write, just before FILE is written; with `after-stage2-0000004:latest.json`, once
that checkpoint folder is in place but before `latest.json` points at it.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["DD2_LOAD_PLUGINS"] = ""

import torch  # noqa: E402

torch.set_num_threads(1)

from synthetic import SyntheticPlugin  # noqa: E402

from dd2cli import losses, plugins  # noqa: E402
from dd2cli.engine import distill  # noqa: E402

plugins.register_plugin(SyntheticPlugin(), name="synthetic")
if os.environ.get("DD2_TEST_EXACT"):  # the exact family's registered teachers as well
    import dd2_exact  # noqa: E402

    plugins.register_plugin(dd2_exact, name="exact")

record_dir = os.environ.get("DD2_TEST_RECORD")
if record_dir:
    rank = int(os.environ.get("RANK", "0"))
    seen = {"gts_batches": []}
    original_gts = losses.gts_loss

    def recording_gts(model, teacher, tokens_BN, labels_B, **kw):
        seen["gts_batches"].append({"shape": list(tokens_BN.shape), "labels": labels_B.tolist(),
                                    "tokens": tokens_BN.tolist(), "model": type(model).__name__})
        return original_gts(model, teacher, tokens_BN, labels_B, **kw)

    distill.gts_loss = recording_gts
    original_run = distill.run

    def recording_run(*args, **kwargs):
        result = original_run(*args, **kwargs)
        params = torch.cat([p.detach().flatten() for p in result.generator.parameters()])
        seen["generator_sum"] = float(params.double().sum())
        seen["generator_abs_sum"] = float(params.double().abs().sum())
        Path(record_dir, f"rank{rank}.json").write_text(json.dumps(seen))
        return result

    distill.run = recording_run

kill_inside = os.environ.get("DD2_TEST_KILL_INSIDE")
if kill_inside:
    import signal

    from dd2cli import files

    folder, _, file_name = kill_inside.partition(":")
    original_write = files.atomic_write

    def killing_write(path, write):
        path = Path(path)
        if folder.startswith("after-"):
            inside = (path.parent / "checkpoints" / folder[len("after-"):]).is_dir()
        else:
            inside = path.parent.name.startswith(f".{folder}.")
        if path.name == file_name and inside:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would: no cleanup at all
        return original_write(path, write)

    files.atomic_write = killing_write

from dd2cli.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "dd2"
    main()
