"""The memory plan (`dd2 distill --dry-run`): counts from the networks, activations traced on the meta device."""

import os
import subprocess
import sys

import pytest
import torch

from dd2cli import plugins
from dd2cli.config import config_layers, resolve_layers
from dd2cli.engine import memory, meta_trace
from dd2cli.errors import DD2Error
from dd2cli.networks import Generator, build_model
from dd2cli.settings import DistillSettings


@pytest.fixture
def var_family():
    import dd2_var

    plugins.register_plugin(dd2_var, name="var")
    return plugins.registry()


def _settings(variant, *sets):
    settings, _ = resolve_layers(DistillSettings, [("variant", dict(variant.distill_defaults)),
                                                   *config_layers(None, tuple(sets))])
    return settings


def _saved_bytes(fn, params):
    """Saved-for-backward bytes of `fn()` with real tensors, each storage once, parameters excluded."""
    seen = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            seen[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for _, n in seen.values())


def test_the_meta_trace_saves_what_the_cpu_saves(var_family):
    """The trace on the meta device (fused attention as the CPU runs it, bicubic maps by shape) counts the bytes
    a real forward on the CPU keeps for its backward pass, for the GTS update and the generator's pass."""
    variant = plugins.get_variant("var-digits")
    teacher = variant.load(device="cpu")
    model = build_model(teacher.new_backbone(), teacher.spec.latent_dim, 32, 2, 2.0, seed=0)
    spec = teacher.spec
    params = {id(p) for p in model.parameters()}
    tokens = torch.randint(0, spec.vocab_size, (2, spec.num_tokens))
    labels = torch.tensor([1, 2])
    eps = torch.randn(2, spec.num_tokens, spec.latent_dim)

    def forward(m, z, y):
        return Generator(m)(z, y).square().mean()

    cpu = _saved_bytes(lambda: forward(model, eps, labels), params)
    meta_model = model.to("meta")
    meta_params = {id(p) for p in meta_model.parameters()}
    trace = meta_trace.Trace([meta_model.backbone, meta_model.head], [meta_model.backbone], meta_params)
    net, other, backbone = trace.run(lambda: forward(meta_model, eps.to("meta"), labels.to("meta")))
    assert net + other == cpu and 0 < backbone < net
    del tokens


@pytest.fixture
def real_families():
    import dd2_llamagen
    import dd2_var

    plugins.register_plugin(dd2_var, name="var")
    plugins.register_plugin(dd2_llamagen, name="llamagen")
    return plugins.registry()


@pytest.mark.parametrize("name, config", [("var-d16", "examples/configs/var-d16.toml"), ("llamagen-b", None),
                                          ("var-digits", None)])
def test_replaying_repeated_blocks_counts_the_bytes_of_tracing_every_one(real_families, monkeypatch, name, config):
    """At real shapes (skeletons on the meta device) and on a digits teacher with its flow-map phase: the plan
    traced with each repeated backbone block replayed from the first equals the plan traced block by block, and the
    replay did skip the blocks' insides."""
    variant = plugins.get_variant(name)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    settings, _ = resolve_layers(DistillSettings, [("variant", dict(variant.distill_defaults)),
                                                   *config_layers(config and os.path.join(root, config), ())])
    calls, built = {"n": 0}, []
    build = memory._build

    def counted_build(*args, **kwargs):  # counts the calls of every linear layer inside a block of a ModuleList
        teacher, model = build(*args, **kwargs)
        built.append(model)
        for sub in model.modules():
            if isinstance(sub, torch.nn.ModuleList):
                for m in (m for block in sub for m in block.modules() if isinstance(m, torch.nn.Linear)):
                    m.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        return teacher, model

    monkeypatch.setattr(memory, "_build", counted_build)
    plans, counts = [], []
    for replay in (False, True):
        calls["n"] = 0
        plan = memory.memory_plan(variant, settings, nproc=1, replay_blocks=replay)
        plans.append([(st.key, update, a) for st in plan.stages for update, a in st.updates])
        counts.append(calls["n"])
    assert plans[0] == plans[1]
    assert all(a.network > 0 and a.backbone > 0 for _, _, a in plans[0])
    assert 0 < counts[1] < counts[0] / 2
    assert not [m for model in built for m in model.modules() if "forward" in vars(m)]  # every block restored


def test_the_plan_counts_the_networks_as_built(var_family):
    variant = plugins.get_variant("var-digits")
    settings = _settings(variant, "stage1.batch_size=8", "stage2.batch_size=8", "flow_init.batch_size=8")
    plan = memory.memory_plan(variant, settings, nproc=1)
    teacher = variant.load(device="cpu")
    h = settings.head
    model = build_model(teacher.new_backbone(), teacher.spec.latent_dim, h.width, h.depth, h.mlp_ratio)
    assert plan.networks["psi"].params == sum(p.numel() for p in model.parameters())
    assert plan.networks["teacher"].params == sum(p.numel() for p in teacher.parameters())
    assert [st.key for st in plan.stages] == ["stage1", "flow_init", "stage2"]  # var-digits ends stage 1 with it
    stage2 = plan.stages[-1]
    one = plan.per_rank(stage2, "ddp", "fp32", False)
    psi = plan.networks["psi"]
    # generator + guidance trained (weights, grads, Adam), EMA held, the frozen teacher
    assert one.held == pytest.approx(plan.networks["teacher"].weight_bytes + 3 * psi.weight_bytes
                                     + 2 * (psi.grad_bytes + psi.adam_bytes))
    assert one.per_sample > 0 and one.batch == 8
    # activations grow with the batch, checkpointing and bf16 shrink them
    for st in plan.stages:
        for _, a in st.updates:
            assert a.per_sample("bf16", False) < a.per_sample("fp32", False)
            assert a.per_sample("fp32", True) <= a.per_sample("fp32", False)


def test_fsdp_divides_what_is_trained_and_ddp_replicates_it(var_family):
    variant = plugins.get_variant("var-digits")
    settings = _settings(variant, "stage2.batch_size=64")
    one, four = memory.memory_plan(variant, settings, nproc=1), memory.memory_plan(variant, settings, nproc=4)
    st1, st4 = one.stages[-1], four.stages[-1]
    ddp1, ddp4 = one.per_rank(st1, "ddp", "fp32", False), four.per_rank(st4, "ddp", "fp32", False)
    fsdp4 = four.per_rank(st4, "fsdp", "fp32", False)
    assert ddp4.held == ddp1.held and ddp4.batch == ddp1.batch / 4
    teacher = four.networks["teacher"].weight_bytes
    assert fsdp4.held - teacher == pytest.approx((ddp4.held - teacher) / 4)
    assert fsdp4.gathered > 0 and ddp4.gathered == 0


def test_the_advice_names_the_change_that_fits(var_family):
    variant = plugins.get_variant("var-digits")
    settings = _settings(variant, "stage2.batch_size=4096", "parallel=ddp", "precision=fp32")
    plan = memory.memory_plan(variant, settings, nproc=4)
    st = plan.stages[-1]
    total = plan.configured(st).total
    plan.gpu_bytes = int(total * 1.01)
    assert plan.advice(st) is None
    bf16 = plan.per_rank(st, "ddp", "bf16", False).total
    plan.gpu_bytes = int((bf16 + total) / 2)
    assert plan.advice(st).startswith("fits with --set precision=bf16 (")
    best = plan.per_rank(st, "fsdp", "bf16", True)
    plan.gpu_bytes = int(best.held + best.gathered + 10.5 * best.per_sample)  # room for 10 sequences per rank
    assert "at most 10 sequences per rank: --set stage2.batch_size=40" in plan.advice(st)
    plan.gpu_bytes = int(best.held / 2)
    assert plan.advice(st).startswith("does not fit even at 1 sequence per rank")


def test_sizes_parse_as_gpu_memory_is_sold():
    assert memory.parse_size("80GB") == 80 * 10**9
    assert memory.parse_size("80 gb") == 80 * 10**9
    assert memory.parse_size("40") == 40 * 10**9
    assert memory.parse_size("79.5GiB") == int(79.5 * 2**30)
    with pytest.raises(DD2Error, match="is not a size"):
        memory.parse_size("eighty")


def test_a_variant_without_skeleton_or_weights_gets_one_sentence(synthetic_plugin, tmp_path, monkeypatch):
    from dataclasses import replace

    from dd2cli.teachers import WeightFile

    variant = replace(plugins.get_variant("synthetic-corr"),
                      weights=(WeightFile(key="w", filename="missing.safetensors"),))
    monkeypatch.setenv("DD2_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(DD2Error, match="needs its weight files .missing.safetensors., as its family builds no "
                                       "skeleton"):
        memory.memory_plan(variant, _settings(variant), nproc=1)


@pytest.mark.slow
def test_dry_run_plans_var_d20_on_8_gpus_without_weights(tmp_path):
    """The README's command: no weight file, no network; every line within 80 columns; a verdict per stage."""
    env = {**os.environ, "DD2_LOAD_PLUGINS": "var", "DD2_WEIGHTS_DIR": str(tmp_path), "DD2_OFFLINE": "1",
           "COLUMNS": "80", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("DD2_LOAD_PLUGINS")  # the installed families, as a user has them
    proc = subprocess.run([sys.executable, "-m", "dd2cli", "distill", "--teacher", "var-d20", "--config",
                           "examples/configs/var-d16.toml", "--dry-run", "--nproc", "8", "--gpu-memory", "80GB"],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Memory plan of var-d20: 8 processes, 80 GB per GPU" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "stage 1 (GTS): " in out and "stage 2 (CSD): " in out
    assert "AR-diffusion" in out and "guidance" in out and "EMA generator" in out
    assert not list(tmp_path.iterdir())  # nothing downloaded, nothing written


def test_nproc_without_dry_run_is_refused(synthetic_plugin):
    from typer.testing import CliRunner

    from dd2cli.cli import app

    result = CliRunner().invoke(app, ["distill", "--teacher", "synthetic-corr", "--nproc", "8"])
    assert result.exit_code != 0 and "add --dry-run" in result.output
