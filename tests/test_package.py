"""metalearn as a user installs it: ``pip install .`` (not editable) into a fresh virtualenv,
used from a folder that is not the checkout. The wheel carries the configs and the console
scripts; the user's own ``conf/`` there adds an experiment."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from metalearn.__main__ import COMMANDS, usage
from tests.helpers import REPO, TINY

USER_EXPERIMENT = """\
# @package _global_
shots: 2
algo:
  inner_lr: 0.123
"""


def test_python_m_metalearn_lists_every_console_script_and_they_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    text = usage()
    for script, target in scripts.items():
        assert script in text and COMMANDS[script][0] in text
        module, _, function = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), target


def test_configs_resolve_to_the_checkout_when_not_installed_as_a_wheel():
    from metalearn.paths import conf_dir

    assert conf_dir() == REPO / "conf"


def test_a_conf_folder_in_the_working_directory_adds_the_users_experiment(tmp_path, monkeypatch):
    import metalearn

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    monkeypatch.chdir(tmp_path)
    cfg = metalearn.compose(["experiment=mine", "algo=fomaml"])
    assert cfg.shots == 2 and cfg.algo.inner_lr == 0.123 and cfg.algo.first_order
    monkeypatch.chdir(tmp_path / "conf")  # elsewhere it is not an option
    with pytest.raises(Exception, match="experiment/mine"):
        metalearn.compose(["experiment=mine"])
    # and a working directory without conf/ (most) gets no warning about it
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    code = "import metalearn; metalearn.compose([])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "searchpath" not in done.stderr, done.stderr


def run(args, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def fresh_venv_with_these_packages(path: Path) -> Path:
    """A new virtualenv that sees this environment's packages (torch & co., so nothing is
    downloaded) through a .pth line, but none of its .pth hooks: the editable metalearn of the
    checkout stays invisible. Returns its bin/ folder."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "parent_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    return path / "bin"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_outside_the_checkout(tmp_path, data_root):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO], REPO, env)
    (wheel,) = wheels.glob("metalearn-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    tracked = run(["git", "ls-files", "conf"], REPO, env).stdout.split()
    assert tracked and {f"metalearn/{f}" for f in tracked} <= shipped

    bin_dir = fresh_venv_with_these_packages(tmp_path / "venv")
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "METALEARN_DATA_DIR": str(data_root)}
    # --no-index: every dependency must already be satisfied by the packages it sees
    pip = [sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q"]
    run([*pip, "--no-index", wheel], tmp_path, env)

    user = tmp_path / "user"
    (user / "conf" / "experiment").mkdir(parents=True)
    (user / "conf" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    show_file = "import metalearn; print(metalearn.__file__)"
    where = run([bin_dir / "python", "-c", show_file], user, env)
    assert str(tmp_path / "venv") in where.stdout  # the installed copy, not the checkout's
    listed = run([bin_dir / "python", "-m", "metalearn"], user, env).stdout
    assert all(script in listed and (bin_dir / script).exists() for script in COMMANDS)
    help_text = run([bin_dir / "metalearn-train", "--help"], user, env).stdout
    assert "Config groups" in help_text and "protonet" in help_text

    trained = run([bin_dir / "metalearn-train", "experiment=mine", "algo=fomaml", *TINY], user, env)
    assert "Warning" not in trained.stderr, trained.stderr
    (run_dir,) = (user / "outputs" / "train" / "runs").glob("*/*")  # <task_name>/runs/<date>/<time>
    assert (run_dir / "metrics.json").exists() and (run_dir / "train.log").exists()
    composed = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "shots: 2" in composed and "inner_lr: 0.123" in composed  # the user's experiment

    report = run([bin_dir / "metalearn-report", "outputs", "--no-plot"], user, env).stdout
    assert "fomaml" in report and (user / "outputs" / "results.md").exists()
    ckpt = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    scored = run(
        [bin_dir / "metalearn-evaluate", f"ckpt={ckpt}", "data.test_episodes=10", "output_dir=ev"],
        user,
        env,
    )
    assert "test/acc" in scored.stdout and (user / "ev" / "metrics.json").exists()
    run([bin_dir / "metalearn-episode", "out=episode.png"], user, env)
    assert (user / "episode.png").stat().st_size > 1000
