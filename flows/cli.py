"""The `agent-forge` command: run a flow locally, and look inside the artifact store."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FLOWS = {"prepare": "flows.prepare:prepare", "cognate": "flows.cognate:cognate", "evomerge": "flows.evomerge:evomerge",
         "quietstar": "flows.quietstar:quietstar", "bitnet": "flows.bitnet:bitnet", "full": "flows.full:full",
         "diagnose": "flows.diagnose:diagnose"}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set data.seed=3 --set data.hub_datasets='["gsm8k"]'` -> nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value)
    return out


def _load_flow(name: str):
    import importlib

    module, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), attr)


class UsageError(Exception):
    """Something the user typed or pointed at is wrong; the message says what and how to fix it (exit 2)."""


def _read_config(path: str | None) -> dict[str, Any]:
    """A config file: JSON or YAML (YAML reads JSON too), a mapping of PipelineConfig sections."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path} is neither JSON nor YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path} holds a {type(raw).__name__}; it must be a mapping of sections, "
                         'e.g. {"preset": "tiny", "data": {"seed": 7}}')
    return raw


def _one_line(e: Any) -> str:
    """A pydantic ValidationError as one line: each field's dotted path, the problem and the value given."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})" if "input" in err else f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def _writable_home(home: str) -> None:
    """Checked before Prefect starts: a home that cannot be written fails in well under a second."""
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        probe = Path(home) / f".write-check-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--home {home} is not writable ({e.strerror or type(e).__name__}); choose another with "
                         "--home or AGENT_FORGE_HOME") from None


def cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from phases.config import PipelineConfig, deep_merge

    raw = deep_merge(_read_config(args.config), _overrides(args.set))
    raw["preset"] = args.preset or raw.get("preset", "tiny")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None
    home = str(Path(args.home or os.environ.get("AGENT_FORGE_HOME", "./.agent-forge")).resolve())
    _writable_home(home)
    os.environ["AGENT_FORGE_HOME"] = home
    # Prefect's task results (the small refs) live beside the artifacts unless told otherwise.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(home) / "prefect-results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines log a failed send
    with _task_runner(args.task_runner, args.address):
        return _run_flow(args.flow, config, home)


def _run_flow(name: str, config, home: str) -> int:
    flow = _load_flow(name)  # after the task runner is chosen: the flows read it when they are defined
    start = time.perf_counter()
    try:
        result = flow(config=config, home=home)
    except _user_errors() as e:  # Prefect has logged the traceback; end on the one line that says what to do
        print(f"\n{name} failed after {time.perf_counter() - start:.1f} s: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not _disk_full(e):
            raise
        from phases.common.resources import free_disk
        from phases.common.sizing import MB

        print(f"\n{name} failed after {time.perf_counter() - start:.1f} s: the disk holding {home} is full "
              f"({free_disk(Path(home)) / MB:.1f} MB free): {type(e).__name__}: {' '.join(str(e).split())}. Free "
              "space there or set AGENT_FORGE_HOME to a larger disk, then run the same command again: the artifacts "
              "finished before it are kept, and the training picks up from its last checkpoint", file=sys.stderr)
        return 1
    print(f"\n{name} finished in {time.perf_counter() - start:.1f} s; artifacts under {home}")
    if hasattr(result, "model_dump_json"):
        print(result.model_dump_json(indent=2, exclude={"report_text"}))
    if getattr(result, "report_text", ""):  # what a user looks at first, so it comes last
        print("\n" + result.report_text)
    return 0


@contextmanager
def _task_runner(kind: str | None, address: str | None) -> Iterator[None]:
    """--task-runner and --address into the environment the flows (and Ray's workers) read. Ray's workers report
    their task runs to the Prefect API: where none is configured, a Prefect server runs for this command."""
    from tasks import scaling

    if address and kind != "ray":
        raise UsageError("--address joins a Ray cluster: it goes with --task-runner ray")
    if kind:
        os.environ[scaling.RUNNER_ENV] = kind
    if address:
        os.environ[scaling.ADDRESS_ENV] = address
    if kind != "ray" or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # the run's last log lines reach the server before it stops
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)


def _disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it came from is a full disk (ENOSPC), as OSError or as a library's message
    (safetensors reports "No space left on device (os error 28)" in an error of its own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _user_errors() -> tuple[type[BaseException], ...]:
    from phases.cognate.trainer import GateCollapse
    from phases.common.checkpoints import CheckpointError
    from phases.common.gates import GateFailed
    from phases.common.resources import PreflightError
    from phases.data.hub_download import DatasetUnavailable
    from phases.evomerge.merge import MergeError
    from phases.quietstar.baking import BakingError
    from phases.quietstar.reasoning_data.generation import GenerationIncomplete
    from phases.quietstar.reasoning_data.openrouter import OpenRouterError
    from phases.quietstar.reinforce import ReinforceError
    from storage import ArtifactError

    return (PreflightError, GateFailed, ArtifactError, DatasetUnavailable, CheckpointError, GateCollapse, MergeError,
            OpenRouterError, GenerationIncomplete, BakingError, ReinforceError)


def _store(args: argparse.Namespace):
    from storage import ArtifactStore

    return ArtifactStore(args.home)


def cmd_list(args: argparse.Namespace) -> int:
    rows = _store(args).list(args.kind)
    if not rows:
        print("no artifacts")
        return 0
    print(f"{'KIND':<16} {'ID':<22} {'CREATED':<20} {'FILES':>5} {'SIZE':>10}  INPUTS")
    for m in rows:
        if "error" in m:
            print(f"{m['kind']:<16} {m['id']:<22} CORRUPT: {m['error']}")
            continue
        size = sum(f["size"] for f in m["files"].values())
        created = m["producer"].get("created_at", "")[:19]
        print(f"{m['kind']:<16} {m['id']:<22} {created:<20} {len(m['files']):>5} {size / 1024:>8.1f}KB  "
              f"{','.join(i[:8] for i in m['inputs']) or '-'}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_store(args).manifest(args.id), indent=2))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    def show(node: dict[str, Any], depth: int) -> None:
        label = f"{node.get('kind', '?')}/{node['id']}" + (f"  ERROR: {node['error']}" if "error" in node else "")
        print("  " * depth + ("└─ " if depth else "") + label)
        for child in node["inputs"]:
            show(child, depth + 1)

    show(_store(args).lineage(args.id), 0)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from storage import ArtifactError

    st = _store(args)
    ids = [args.id] if args.id else [m["id"] for m in st.list()]
    bad = 0
    for aid in ids:
        try:
            m = st.verify(aid)
            print(f"ok       {m['kind']}/{m['id']} ({len(m['files'])} files)")
        except ArtifactError as e:
            bad += 1
            print(f"CORRUPT  {e}")
            if args.repair:
                moved = st.quarantine(st.load(aid, verify=False), str(e))
                print(f"         moved to {moved}; the next run of the flow that made it, with this home, "
                      "builds it again from its recipe")
    print(f"{len(ids) - bad} ok, {bad} corrupt" + (f", {bad} quarantined" if args.repair and bad else ""))
    return 1 if bad and not args.repair else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from phases.evomerge.merge import MergeError
    from phases.evomerge.mergekit_yaml import run

    if not Path(args.config).is_file():
        raise UsageError(f"{args.config}: no such file")
    start = time.perf_counter()
    try:
        out = run(args.config, args.out_dir)
    except (MergeError, KeyError, TypeError, ValueError, SafetensorError, OSError) as e:
        print(f"error: {args.config}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"merged model written to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """The state diagnostics of a model directory or a store artifact, without Prefect; exit 0 on GO, 1 on NO-GO."""
    from pydantic import ValidationError

    from phases.cognate import steps
    from phases.cognate.settings import CognateDiagnostics

    try:
        settings = CognateDiagnostics.model_validate(_overrides(args.set))
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None
    target = Path(args.target)
    if target.is_dir():
        model_dir, name = target, target.resolve().name
        out = Path(args.out or f"diagnosis-{name}")
    else:
        st = _store(args)
        ref = st.ref(args.target)  # a unique id prefix is enough; an unknown one is an ArtifactError
        model_dir, name = st.load(ref), f"{ref.kind} {ref.id[:12]}"
        out = Path(args.out) if args.out else Path(st.root) / "diagnoses" / ref.id
    config = model_dir / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "cognate":
        raise UsageError(f"{args.target}: not a Cognate-family model (no config.json with model_type cognate); the "
                         "diagnostics read a Cognate, EvoMerge or Quiet-STaR model")
    start = time.perf_counter()
    head = steps.diagnose_model(model_dir, settings, out, name)
    print((out / steps.DIAGNOSIS_REPORT).read_text())
    print(f"{name}: {head['verdict']} (state health {head['health']:.2f}) in {time.perf_counter() - start:.1f} s; "
          f"{steps.DIAGNOSIS_REPORT}, {steps.DIAGNOSIS_FIGURE} and {steps.DIAGNOSIS} in {out}")
    return 0 if head["verdict"] == "GO" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-forge", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback too")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flow locally (no server needed)")
    run.add_argument("flow", choices=sorted(FLOWS))
    run.add_argument("--preset", choices=["tiny", "small"], help="default: tiny, or the --config file's")
    run.add_argument("--config", help="JSON or YAML file with PipelineConfig sections")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.seed=3")
    run.add_argument("--home", help="artifact store root (default: $AGENT_FORGE_HOME or ./.agent-forge)")
    run.add_argument("--task-runner", choices=["local", "ray"], help=(
        "where fan-out tasks run: this process's thread pool (default) or Ray"))
    run.add_argument("--address", help="with --task-runner ray: a running Ray cluster to join (default: start one here)")
    run.set_defaults(func=cmd_run)

    merge = sub.add_parser("merge", help="run a mergekit-style YAML (linear, slerp, task_arithmetic, ties, "
                                        "dare_ties, dare_linear, passthrough) and write a model directory")
    merge.add_argument("config", help="the YAML file; model paths are relative to it")
    merge.add_argument("out_dir")
    merge.set_defaults(func=cmd_merge)

    diag = sub.add_parser("diagnose", help="state diagnostics D1-D4 and the go/no-go verdict of a Cognate-family model "
                                          "(exit 0 on GO, 1 on NO-GO)")
    diag.add_argument("target", help="a model directory, or a store artifact id (a unique prefix is enough)")
    diag.add_argument("--home", default=None, help="store root (default: $AGENT_FORGE_HOME or ./.agent-forge)")
    diag.add_argument("--out", help="where the report goes (default: ./diagnosis-NAME, or <home>/diagnoses/ID)")
    diag.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a diagnostics setting, e.g. trials=96")
    diag.set_defaults(func=cmd_diagnose)

    art = sub.add_parser("artifacts", help="inspect the artifact store")
    art.add_argument("--home", default=None, help="store root (default: $AGENT_FORGE_HOME or ./.agent-forge)")
    art_sub = art.add_subparsers(dest="artifacts_command", required=True)
    p = art_sub.add_parser("list")
    p.add_argument("--kind")
    p.set_defaults(func=cmd_list)
    for name, func, help_ in (("show", cmd_show, "print the manifest"), ("lineage", cmd_lineage, "input tree")):
        p = art_sub.add_parser(name, help=help_)
        p.add_argument("id", help="artifact id (a unique prefix is enough)")
        p.set_defaults(func=func)
    p = art_sub.add_parser("verify", help="re-hash files; exit 1 on any mismatch")
    p.add_argument("id", nargs="?")
    p.add_argument("--repair", action="store_true",
                   help="move corrupt artifacts to quarantine/ (with a note), so the next run rebuilds them")
    p.set_defaults(func=cmd_verify)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # an error a user can act on ends on one line, not a traceback
        from storage import ArtifactError

        if args.debug or not isinstance(e, UsageError | ArtifactError):
            raise
        logged = _log_traceback(getattr(args, "home", None))
        where = f" (traceback: {logged})" if logged else ""
        print(f"error: {' '.join(str(e).split())}{where}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def _log_traceback(home: str | None) -> Path | None:
    """The current exception's traceback appended to <home>/logs/errors.log; None where it cannot be written
    (the error may be that home itself is unwritable)."""
    import traceback

    if not home:
        return None
    path = Path(home) / "logs" / "errors.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(traceback.format_exc() + "\n")
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
