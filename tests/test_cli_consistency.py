"""One CLI: the same names for the same things on every command, checked by walking the click tree.

A new command fails here until it follows the conventions (or is listed as an exception with
its reason): MODEL positional, -o/--output and --force on writers, --json on reporters, -q/-v
everywhere, progress bars only on a terminal, old spellings accepted with one deprecation line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from nestpatch.cli import cli, inputs
from nestpatch.cli.options import (REMOVED_IN, dataclass_options, dataclass_overrides, model_argument, output_option,
                                   progress_option)

COMMANDS = dict(cli.commands)

#: Commands that write one output file or directory of their own; --force replaces an existing one.
WRITERS = {"apply", "revert", "export-lora", "keygen", "sign", "report", "train", "select"}
#: Commands whose output is a run directory: an earlier run there is continued (--resume or a rerun), never replaced.
RUN_DIRS = {"eval", "bench", "tune", "robustness"}
#: Commands that take the model they work on (positional MODEL). ``diff --model`` is the model of
#: --behaviour, an option of an option, after two positional patches: it stays an option.
MODEL_COMMANDS = {"apply", "chat", "eval", "verify", "train", "bench", "tune", "robustness", "select"}
#: Every command reports something except the interactive chat.
NO_JSON = {"chat"}


def _opts(cmd: click.Command, *, hidden: bool = False) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) and (hidden or not p.hidden) for o in p.opts + p.secondary_opts}


def test_every_command_accepts_quiet_and_verbose():
    for name, cmd in COMMANDS.items():
        assert {"-q", "--quiet", "-v", "--verbose"} <= _opts(cmd), name
    assert {"-q", "-v"} <= _opts(cli)


def test_writers_have_output_and_force():
    for name in WRITERS | RUN_DIRS:
        assert {"-o", "--output"} <= _opts(COMMANDS[name]), name
    for name in WRITERS:
        assert "--force" in _opts(COMMANDS[name]), name


def test_no_visible_old_spellings():
    """``--out`` and ``--model`` parse (hidden) but are never offered; ``-o`` always means ``--output``."""
    for name, cmd in COMMANDS.items():
        visible = _opts(cmd)
        assert "--out" not in visible, name
        if name in MODEL_COMMANDS:
            assert "--model" not in visible, name
        for p in cmd.params:
            if isinstance(p, click.Option) and "-o" in p.opts:
                assert "--output" in p.opts, name


def test_model_is_positional():
    for name in MODEL_COMMANDS:
        args = [p for p in COMMANDS[name].params if isinstance(p, click.Argument)]
        assert args and args[0].name == "model", name


def test_json_on_every_reporting_command():
    for name, cmd in COMMANDS.items():
        if name not in NO_JSON:
            assert "--json" in _opts(cmd), name


def test_progress_flags_where_there_are_bars():
    for name in ("apply", "revert", "train", "eval", "bench", "robustness"):
        assert {"--progress", "--no-progress"} <= _opts(COMMANDS[name]), name


def test_all_commands_are_classified():
    """A new command must be placed in the lists above (or be a pure reader)."""
    readers = {"inspect", "validate", "fetch", "diff", "verify", "verify-signature", "chat"}
    assert set(COMMANDS) == readers | WRITERS | RUN_DIRS, set(COMMANDS) ^ (readers | WRITERS | RUN_DIRS)


# ------------------------------------------------------------------------------- deprecated spellings


def _warning(old: str, new: str) -> str:
    return f"warning: {old} is deprecated, use {new} (removed in {REMOVED_IN})"


def test_old_out_still_works_with_one_deprecation_line(tmp_path):
    pytest.importorskip("cryptography")
    key = tmp_path / "k"
    r = CliRunner().invoke(cli, ["keygen", "--out", str(key)])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [_warning("--out", "-o/--output")]
    assert key.exists() and (tmp_path / "k.pub").exists()


def test_old_model_and_out_on_train_reach_the_command(tmp_path):
    """``train --model M --out O``: both move onto the new names (the missing model then fails as usual)."""
    r = CliRunner().invoke(cli, ["train", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.nestpatch")])
    lines = r.stderr.splitlines()
    assert lines[:2] == [_warning("--model", "the positional MODEL"), _warning("--out", "-o/--output")], r.stderr
    assert r.exit_code == 2 and len(lines) == 3 and lines[2].startswith("error: ") and "none" in lines[2]


def test_old_and_new_spelling_together_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--out and -o/--output both given" in r.stderr


def test_missing_required_model_and_output_are_usage_errors():
    r = CliRunner().invoke(cli, ["bench"])
    assert r.exit_code == 2 and "Missing argument 'MODEL'" in r.stderr
    r = CliRunner().invoke(cli, ["bench", "smollm2"])
    assert r.exit_code == 2 and "Missing option '-o' / '--output'" in r.stderr


def test_bench_model_option_still_parses(monkeypatch, tmp_path):
    seen = {}
    import nestpatch.baselines.bench as bench

    def fake(cfg):
        seen["model"] = cfg.model
        return {}

    monkeypatch.setattr(bench, "run_bench", fake)
    r = CliRunner().invoke(cli, ["bench", "--model", "m.gguf", "-o", str(tmp_path / "b"), "--json", "--methods", "nest"])
    assert r.exit_code == 0, r.output
    assert seen["model"] == "m.gguf"
    assert r.stderr.splitlines() == [_warning("--model", "the positional MODEL")]
    assert json.loads(r.stdout) == {}


# ------------------------------------------------------------------------------------------ progress


def _probe() -> click.Command:
    @click.command()
    @progress_option
    def probe(progress: bool) -> None:
        click.echo(json.dumps(progress))

    from nestpatch.cli.options import add_verbosity

    add_verbosity(probe)
    return probe


def test_progress_off_when_stderr_is_not_a_terminal():
    assert CliRunner().invoke(_probe(), []).stdout.strip() == "false"  # CliRunner's stderr is no TTY
    assert CliRunner().invoke(_probe(), ["--progress"]).stdout.strip() == "true"


def test_progress_on_a_terminal_unless_quiet(monkeypatch):
    import sys

    class Tty:
        def isatty(self) -> bool:
            return True

    def run(*args: str) -> str:
        probe = _probe()
        with click.Context(probe) as ctx:
            monkeypatch.setattr(sys, "stderr", Tty())
            try:
                probe.parse_args(ctx, list(args))
                from nestpatch.cli.options import show_progress

                return json.dumps(show_progress(ctx.params["progress"]))
            finally:
                monkeypatch.undo()

    assert run() == "true"
    assert run("-q") == "false"
    assert run("-q", "--progress") == "true"
    assert run("--no-progress") == "false"


def test_revert_passes_no_progress_off_a_terminal(monkeypatch, tmp_path):
    seen = {}

    def fake(patched, out, *, force, progress):
        seen["progress"] = progress
        return out

    monkeypatch.setattr(inputs, "revert", fake)
    r = CliRunner().invoke(cli, ["revert", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "o.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    assert seen == {"progress": False}
    assert json.loads(r.stdout)["out"] == str(tmp_path / "o.gguf")


# ----------------------------------------------------------------------------------------- verbosity


@pytest.mark.parametrize("args, level", [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                                         (["-q"], logging.ERROR)])
def test_verbosity_after_the_command_name(tmp_path, args, level):
    root = logging.getLogger()
    before = root.level
    try:
        r = CliRunner().invoke(cli, ["validate", str(tmp_path / "missing.nestpatch"), *args])
        assert r.exit_code == 2
        assert root.level == level
        r = CliRunner().invoke(cli, [*args, "validate", str(tmp_path / "missing.nestpatch")])  # before it, too
        assert root.level == level
    finally:
        root.setLevel(before)


# ------------------------------------------------------------------------------------------------ json


def test_json_is_one_object_on_stdout(tmp_path, pico_patch):
    from nestpatch.format import write_patch

    p = write_patch(pico_patch, tmp_path / "p.nestpatch")
    r = CliRunner().invoke(cli, ["validate", str(p), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["patches"][0]["ok"] is True and doc["patches"][0]["content_digest"].startswith("sha256:")
    pytest.importorskip("cryptography")
    r = CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--json"])
    assert r.exit_code == 0 and set(json.loads(r.stdout)) == {"private_key", "public_key", "key_id"}
    r = CliRunner().invoke(cli, ["sign", str(p), "--key", str(tmp_path / "k"), "-o", str(tmp_path / "s.nestpatch"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["out"] == str(tmp_path / "s.nestpatch")


# ------------------------------------------------------------------------------------ building blocks


@dataclass
class _Settings:
    steps: int = field(default=10, metadata={"help": "Steps."})
    rate: float | None = None
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    names: tuple[str, ...] = ("x",)
    layers: list[int] = field(default_factory=list)
    fast: bool = True
    hidden: str = "no flag"


def test_dataclass_options_generates_and_reads_back():
    @click.command()
    @dataclass_options(_Settings, exclude=("hidden",), help={"rate": "Rate."})
    def cmd(**kw):
        click.echo(json.dumps(dataclass_overrides(_Settings, kw, exclude=("hidden",))))

    assert "--hidden" not in _opts(cmd)
    assert {"--steps", "--rate", "--mode", "--names", "--layers", "--fast", "--no-fast"} <= _opts(cmd)
    r = CliRunner().invoke(cmd, ["--steps", "3", "--names", "p,q", "--names", "r", "--layers", "1,2", "--no-fast", "--mode", "b"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"steps": 3, "names": ["p", "q", "r"], "layers": [1, 2], "fast": False, "mode": "b"}
    assert CliRunner().invoke(cmd, ["--mode", "c"]).exit_code == 2
    assert json.loads(CliRunner().invoke(cmd, []).stdout) == {}  # nothing given: nothing overridden
    assert "Rate." in CliRunner().invoke(cmd, ["--help"]).stdout


def test_aliases_compose_on_a_new_command(tmp_path):
    @click.command()
    @model_argument(old_option=True)
    @output_option("out", required=True)
    def cmd(model, out):
        click.echo(f"{model} {out}")

    r = CliRunner().invoke(cmd, ["m", "-o", "o"])
    assert (r.exit_code, r.stdout.strip(), r.stderr) == (0, "m o", "")
    r = CliRunner().invoke(cmd, ["--model", "m", "--out", "o"])
    assert r.exit_code == 0 and r.stdout.strip() == "m o" and len(r.stderr.splitlines()) == 2


# ------------------------------------------------------------------------- options from one dataclass


def _settings_classes() -> dict[str, tuple[type, tuple[str, ...]]]:
    """Per command: its settings dataclass, and the options that are not fields (what to run on; listed in the command)."""
    from nestpatch.baselines.options import BenchOptions
    from nestpatch.cli import bench_cmd, eval_cmd, robustness_cmd, tune_cmd
    from nestpatch.evaluate.options import EvalOptions
    from nestpatch.robustness.options import RobustnessOptions
    from nestpatch.train.config import TrainConfig
    from nestpatch.tune.options import TuneOptions

    return {"eval": (EvalOptions, eval_cmd.CALL_ARGUMENTS), "bench": (BenchOptions, bench_cmd.CALL_ARGUMENTS),
            "robustness": (RobustnessOptions, robustness_cmd.CALL_ARGUMENTS), "train": (TrainConfig, ("config_file",)),
            "tune": (TuneOptions, tune_cmd.CALL_ARGUMENTS)}


#: Options about the command's own output, on no settings dataclass.
CLI_ONLY = {"as_json", "force", "progress"}


def _flat_fields(cls: type) -> dict[str, bool]:
    """Parameter name -> whether the field is a flag (a ``prefix`` field's own fields carry the prefix)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if "prefix" in f.metadata:
            out.update({f.metadata["prefix"] + k: v for k, v in _flat_fields(f.default_factory().__class__).items()})
        else:
            out[f.name] = f.metadata.get("cli", True) is not False
    return out


@pytest.mark.parametrize("name", ["eval", "bench", "robustness", "train", "tune"])
def test_every_option_is_a_field_of_the_commands_dataclass(name):
    cls, call_args = _settings_classes()[name]
    params = {p.name for p in COMMANDS[name].params if p.expose_value and not getattr(p, "hidden", False)}
    fields = _flat_fields(cls)
    assert set(call_args) <= params and not set(call_args) & set(fields), (name, call_args)  # the list is up to date
    assert params - set(fields) - set(call_args) - CLI_ONLY == set(), name  # no hand-written setting
    assert {f for f, flag in fields.items() if flag} - params == set(), name  # no field without its flag (cli=False: none wanted)


def test_bench_options_defaults_are_the_runners():
    import dataclasses

    from nestpatch.baselines.bench import BenchConfig
    from nestpatch.baselines.options import BenchOptions

    cfg = {f.name: f for f in dataclasses.fields(BenchConfig)}
    for f in dataclasses.fields(BenchOptions):
        if f.name in cfg and f.name != "train_config":
            mine = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            theirs = cfg[f.name].default_factory() if cfg[f.name].default_factory is not dataclasses.MISSING else cfg[f.name].default
            assert mine == theirs, f.name


def test_eval_parses_into_eval_options(monkeypatch, tmp_path):
    from nestpatch.cli import eval_cmd

    seen = {}

    def fake(model, patch, names, *, backend, out_dir, options):
        seen.update(model=model, names=names, backend=backend, options=options)
        return {"headline": {}, "wall_seconds": 0.0}

    monkeypatch.setattr(eval_cmd, "run_suites", fake)
    out = str(tmp_path / "run")
    r = CliRunner().invoke(cli, ["eval", "m.gguf", "--suite", "harmbench, benign", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    o = seen["options"]
    assert seen["names"] == ["harmbench", "benign"] and seen["backend"] == "torch"
    assert (o.max_new_tokens, o.harmful_max_new_tokens, o.batch_size, o.judges) == (64, 128, 8, ("refusal-phrase", "strict-refusal"))
    assert (o.limit, o.n_threads, o.require_signature, o.resume, o.compare, o.progress) == (None, None, None, False, False, False)
    r = CliRunner().invoke(cli, ["eval", "m.gguf", "--suite", "harmbench", "-o", out, "--judge", "harm, composite", "--threads", "2",
                                 "--limit", "3", "--compare", "--resume", "--max-new-tokens", "5", "--file-kind", "benign", "--json"])
    assert r.exit_code == 0, r.output
    o = seen["options"]
    assert (o.judges, o.n_threads, o.limit, o.compare, o.resume, o.max_new_tokens, o.harmful_max_new_tokens, o.file_kind) == \
        (("harm", "composite"), 2, 3, True, True, 5, 128, "benign")
    assert CliRunner().invoke(cli, ["eval", "m.gguf", "--suite", "x", "-o", out, "--limit", "0"]).exit_code == 2


def test_robustness_parses_into_robustness_options(monkeypatch, tmp_path):
    import nestpatch.robustness.runner as runner
    import nestpatch.robustness.updates as updates

    seen = {}
    monkeypatch.setattr(updates, "classify", lambda name, path: updates.SafetyUpdate(name, "nestpatch", str(path)))
    monkeypatch.setattr(runner, "run_robustness", lambda model, ups, out, opts: seen.update(opts=opts, ups=ups) or {})
    base = ["robustness", "m", "--patch", "p.nestpatch", "-o", str(tmp_path / "o"), "--json"]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 0, r.output
    o = seen["opts"]
    assert (o.prune_counts, o.finetune.steps, o.finetune.rank, o.finetune.lr, o.limit, o.attack_base) == \
        ((50, 200, 800), (10, 50, 100), 8, 2e-4, 40, True)
    r = CliRunner().invoke(cli, base + ["--prune", "16,4", "--ft-steps", "2,1", "--ft-rank", "4", "--seed", "7", "--no-base-attacks",
                                        "--judge", "refusal-phrase,strict-refusal"])
    assert r.exit_code == 0, r.output
    o = seen["opts"]
    assert (o.prune_counts, o.finetune.steps, o.finetune.rank, o.finetune.seed, o.seed, o.attack_base, o.judges) == \
        ((4, 16), (1, 2), 4, 7, 7, False, ("refusal-phrase", "strict-refusal"))
    r = CliRunner().invoke(cli, base + ["--prune", "4,x"])
    assert r.exit_code == 2 and "--prune '4,x': expected comma-separated integers" in r.output and r.output.count("\n") == 1


def test_bench_parses_into_bench_options(monkeypatch, tmp_path):
    import nestpatch.baselines.bench as bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda cfg: seen.update(cfg=cfg) or {})
    base = ["bench", "m.gguf", "-o", str(tmp_path / "b"), "--json"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    c = seen["cfg"]
    assert (c.methods, c.isolate, c.include_base, c.speed, c.max_new_tokens, c.method_options) == \
        (["nest", "lora", "full", "cb"], True, True, True, 64, {})
    r = CliRunner().invoke(cli, base + ["--methods", "lora,cb", "--in-process", "--no-base", "--no-speed", "--steps", "lora=5",
                                        "--lr", "0.1", "--option", 'cb.layers=[1,2]', "--lora-rank", "4", "--seed", "3",
                                        "--bf16"])
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    assert (c.methods, c.isolate, c.include_base, c.speed) == (["lora", "cb"], False, False, False)
    assert c.method_options == {"lora": {"steps": 5, "lr": 0.1, "rank": 4}, "cb": {"lr": 0.1, "layers": [1, 2]}}
    assert (c.train_config.seed, c.train_config.bf16) == (3, True)


@dataclass
class _Inner:
    steps: tuple[int, ...] = field(default=(1, 2), metadata={"help": "Steps."})
    secret: int = field(default=5, metadata={"cli": False})


@dataclass
class _Shaped:
    n: int = field(default=2, metadata={"help": "N.", "min": 1, "max": 9})
    names: tuple[str, ...] = field(default=("a",), metadata={"flag": "--name", "cli_default": ("a", "b")})
    raw: tuple[str, ...] = field(default=(), metadata={"flag": "--raw", "split": False})
    parallel: bool = field(default=True, metadata={"flag": "--serial", "negate": True, "flag_help": "One at a time."})
    inner: _Inner = field(default_factory=_Inner, metadata={"prefix": "in_"})
    internal: int = field(default=0, metadata={"cli": False})


def test_dataclass_options_metadata_shapes_the_flags():
    from nestpatch.cli.options import dataclass_from_options, option_names

    @click.command()
    @dataclass_options(_Shaped)
    def cmd(**kw):
        o = dataclass_from_options(_Shaped, kw)
        click.echo(json.dumps([o.n, o.names, o.raw, o.parallel, o.inner.steps, o.inner.secret, o.internal]))

    assert option_names(_Shaped) == ["n", "names", "raw", "parallel", "in_steps"]
    assert {"--n", "--name", "--raw", "--serial", "--in-steps"} == _opts(cmd) - {"--help"}
    assert json.loads(CliRunner().invoke(cmd, []).stdout) == [2, ["a", "b"], [], True, [1, 2], 5, 0]
    r = CliRunner().invoke(cmd, ["--n", "3", "--name", "x, y", "--raw", "k=1,2", "--serial", "--in-steps", "3,4"])
    assert json.loads(r.stdout) == [3, ["x", "y"], ["k=1,2"], False, [3, 4], 5, 0]
    assert CliRunner().invoke(cmd, ["--n", "10"]).exit_code == 2
    page = CliRunner().invoke(cmd, ["--help"]).stdout
    assert "One at a time." in page and "[default: a,b]" in page and "1<=x<=9" in page
