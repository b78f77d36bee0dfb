"""Shared plumbing of the Hydra entry points (train.py, steer.py, eval.py).

`run_entry_point` checks the command line before Hydra starts (so a typo in a group option or a bad value is one
line and exit code 2, not a page of Hydra help), then runs the stage and turns any `UserError` into one line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

from sae_reasoning.config import REPO_ROOT, register_configs, validate
from sae_reasoning.errors import UserError

CONF_DIR = REPO_ROOT / "conf"
# Hydra flags that take a value (the value is not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_PRINT_ONLY = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--resolve",
               "--shell-completion", "-sc"}


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _overrides(argv: list[str]) -> tuple[list[str], set[str]]:
    overrides, flags, skip = [], set(), False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            flags.add(arg)
            skip = arg in _FLAGS_WITH_VALUE
            continue
        overrides.append(arg)
    return overrides, flags


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    for ov in overrides:
        m = re.fullmatch(r"[+~]?(\w+)=(.*)", ov)
        if not m or not (CONF_DIR / m.group(1)).is_dir():
            continue
        group, values = m.group(1), m.group(2)
        for value in re.split(r",", values.strip("[]")) if values else []:
            if value and value not in group_options(group):
                fail(f"unknown {group} '{value}': choose one of {', '.join(group_options(group))} "
                     f"(files in {CONF_DIR / group})")


def compose_config(overrides: list[str]) -> Any:
    """Compose the config as Hydra would, for pre-flight checks and for tests."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _one_line(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(
            ("full_key", "object_type", "reference_type", "Set the environment"))]
        if lines and lines[0] not in parts:
            parts.append(lines[0])
        exc = exc.__cause__
    return ": ".join(parts) or "invalid configuration"


def preflight(argv: list[str]) -> None:
    """Fail before any heavy work, with one line, on an unknown group option, a bad value or a bad combination."""
    overrides, flags = _overrides(argv)
    _check_group_choices(overrides)
    if flags & _PRINT_ONLY or flags & {"-m", "--multirun"}:
        return  # printing-only runs need no checks; multirun jobs are checked one by one in the task
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        cfg = compose_config(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all are user mistakes here
        fail(_one_line(exc))
    try:
        validate(cfg)
    except UserError as exc:
        fail(str(exc))


def run_stage(stage: Callable[[Any, Path], Any], cfg: Any) -> Any:
    """Run one stage inside Hydra with the run folder; a `UserError` becomes one line and exit code 2."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.progress:  # quiet means quiet: also transformers' / the hub's own bars (stderr = errors only)
        import os

        import transformers

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        transformers.utils.logging.disable_progress_bar()
    resume = resume_command(run_dir)
    try:
        validate(cfg)
        print(f"run folder: {run_dir}  (after a crash or kill, resume with: {resume})", flush=True)
        return stage(cfg, run_dir)
    except UserError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(f"interrupted; resume where it stopped with: {resume}", 130)


def resume_command(run_dir: Path) -> str:
    """This command line pointed at `run_dir`: Hydra's default run folder is new each time, and the stages resume
    from their run folder (traces and activations are cached by fingerprint for any folder)."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return shlex.join(["python", Path(sys.argv[0]).name, *args, f"hydra.run.dir={run_dir}"])
