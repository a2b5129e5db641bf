"""What the user commands share: ``key=value`` options, ``--help``, errors without tracebacks."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from metalearn.errors import ConfigError, MetalearnError


def parse(argv: list[str], options: dict[str, str | None], usage: str) -> tuple[dict, list]:
    """Split ``argv`` into the tool's own ``options`` (name -> default; None = required) and
    the other ``key=value`` arguments (Hydra overrides of the training config). ``-h``/``--help``
    prints ``usage`` and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    values, rest = dict(options), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            raise ConfigError(f"{arg!r}: arguments are key=value (see --help)")
        if key in options:
            values[key] = value
        else:
            rest.append(f"{key}={value}")
    missing = [k for k, v in values.items() if v is None or (options[k] is None and v == "")]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)} (see --help)")
    return values, rest


def flag(name: str, value: str) -> bool | None:
    """auto/true/false option -> None/True/False."""
    text = str(value).lower()
    if text in ("auto", "none", "null", ""):
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value}: use auto, true or false")


def default_output(task: str, log_dir: str = "outputs") -> Path:
    """``<log_dir>/<task>/runs/<date>/<time>``: where a command's run goes, as a training
    run's ``hydra.run.dir`` (``task``: its ``task_name``: train, evaluate, adapt, ...)."""
    return Path(log_dir, task, "runs", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))


def configured_log_dir() -> str:
    """``paths.log_dir`` as this machine's config sets it (conf/paths, conf/local), for the
    commands that do not compose the training config themselves."""
    import metalearn

    return str(metalearn.compose(["output_dir=."]).paths.log_dir)


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: show the traceback instead of the one message."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def print_error(err: Exception) -> None:
    """The one message naming the fix, in place of a traceback."""
    print(f"\nError ({type(err).__name__}): {err}", file=sys.stderr)
    print("(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)


def main_of(run: Callable[[list[str]], int | None]) -> Callable[[], None]:
    """A console entry point: one message naming the fix (exit 1) instead of a traceback for
    the errors a user can act on (``HYDRA_FULL_ERROR=1`` shows the traceback)."""

    def main() -> None:
        from metalearn.utils import log_through_hydra

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        log_through_hydra()  # Lightning's adverts and deprecation noise, as in training
        try:
            status = run(sys.argv[1:])
        except MetalearnError as err:
            if full_error():
                raise
            print_error(err)
            raise SystemExit(1) from None
        raise SystemExit(status or 0)

    return main


# Config options that need an optional extra (a Hydra plugin): option -> (module, extra)
PLUGINS = {
    "hparams_search=optuna_lr": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def check_plugins(argv: list[str]) -> None:
    """Exit with one message naming the install command when an option needs a Hydra plugin
    that is not installed (Hydra's own error is a page about config schemas)."""
    import importlib.util

    for arg in argv:
        for option, (module, extra) in PLUGINS.items():
            key, _, value = option.partition("=")
            given = arg.lstrip("+").split("=", 1)
            if len(given) != 2 or given[0] != key or value not in given[1].split(","):
                continue
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                print(
                    f"\nError (ConfigError): {option} needs an optional plugin: "
                    f'pip install -e ".[{extra}]" (or pip install "metalearn[{extra}]")',
                    file=sys.stderr,
                )
                raise SystemExit(1)


def check_train_argv(argv: list[str]) -> None:
    """What the training commands (``train.py``, ``metalearn-train``) check before Hydra runs,
    each ending in one message: a missing optional plugin names its install, a mistyped key
    the close ones."""
    check_plugins(argv)
    check_override_keys(argv)


def check_override_keys(argv: list[str]) -> None:
    """Exit with one message naming the close keys when an override sets a key the config does
    not have (Hydra's own message suggests adding it with ``+``, which only moves the error).
    Runs only Hydra's composition: anything it cannot diagnose is left to Hydra."""
    if any(a.split("=", 1)[0] in CONFIG_SWITCHES for a in argv):
        return  # another config than train.yaml
    try:
        overrides = first_values([a for a in argv if "=" in a and not a.startswith("-")])
        message = unknown_key_message(overrides) if overrides else None
    except Exception:  # noqa: BLE001  a check before Hydra must never stop a valid run
        return
    if message:
        print(f"\nError (ConfigError): {message}", file=sys.stderr)
        raise SystemExit(1)


CONFIG_SWITCHES = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def first_values(args: list[str]) -> list[str]:
    """The overrides with each sweep (``shots=1,5``, ``range(...)``) cut to its first value: the
    keys of every job of a sweep are the same."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(args):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        prefix = "++" if o.is_force_add() else "+" if o.is_add() else ""
        package = f"@{o.package}" if o.package else ""
        out.append(f"{prefix}{o.key_or_group}{package}={next(o.sweep_string_iterator())}")
    return out


def unknown_key_message(overrides: list[str]) -> str | None:
    """Why ``overrides`` do not compose when one sets a key the config lacks, else None."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from metalearn.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            compose("train", overrides=overrides)
            return None
        except ConfigCompositionException as err:
            cause = err.__cause__
        if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not cause.full_key:
            return None
        missing = str(cause.full_key)
        given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].startswith(missing)]
        if not given or given[0].startswith("+"):
            return None
        cfg = compose("train", overrides=[o for o in overrides if o not in given])
    node, where = cfg, []
    for part in missing.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            break
        node, where = node[part], [*where, part]
    if not isinstance(node, DictConfig):
        return None
    prefix = "".join(f"{w}." for w in where)
    keys = [str(k) for k in node if not str(k).startswith("_")]  # not _target_
    close = difflib.get_close_matches(part, keys, n=3)
    hint = f": did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    keys = ", ".join(keys)
    return (
        f"{given[0].split('=', 1)[0]} is not in the config{hint} "
        f"({'.'.join(where) or 'the top level'} has: {keys})"
    )
