"""Each study's settings are spelled once: the dataclass, from which the command line is made."""

from __future__ import annotations

import dataclasses

import pytest

from cryosip import experiments
from cryosip.cli import experiment as cli_experiment


def _settings(name: str, argv: list[str]):
    """The Settings a study's ``run`` would get from ``argv`` (without running it)."""
    module = experiments.load(name)
    got = {}
    module_run = module.run
    try:
        module.run = lambda out, settings: got.update(out=out, settings=settings)
        assert cli_experiment.run_study(name, module, argv) == 0
    finally:
        module.run = module_run
    return got["out"], got["settings"]


@pytest.mark.parametrize("name", experiments.available())
def test_every_study_has_settings_with_help_and_a_quick_variant(name):
    cls = experiments.load(name).Settings
    default, quick = cls(), cls.quick()
    assert all(f.metadata["help"] for f in dataclasses.fields(cls))
    assert default != quick  # --quick changes something
    # the flags are generated: one per field (seeds through --seed/--seeds)
    parser = cli_experiment.settings_parser(name, experiments.load(name))
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(cls)} - {"seeds"} <= dests


def test_flags_become_settings():
    out, s = _settings(
        "pose-errors",
        ["--out", "x", "--quick", "--seeds", "1,2", "--rot-errors", "5,0", "--n-draws", "4"],
    )
    assert out == "x" and s.seeds == (1, 2) and s.n_draws == 4
    # sorted, the alias --rot-errors kept; --quick values for what was not given
    assert s.rotation_errors_in_degrees == (0.0, 5.0)
    assert s.shift_errors_in_angstroms == (0.0, 2.0) and s.n_images == 400
    _, s = _settings("pose-errors", ["--shift-errors-in-angstroms", "1", "--all-atom"])
    assert s.shift_errors_in_angstroms == (1.0,) and s.all_atom and s.model_name == "adk"
    assert s.n_images == 1000  # the default without --quick
    _, s = _settings("toys", ["--no-2d", "--truths", "bimodal", "--seed", "3"])
    assert s.with_2d is False and s.truths == ("bimodal",) and s.seeds == (3,)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="unknown methods"):
        experiments.load("robustness").Settings(methods=("wgf-kl", "nope"))
    with pytest.raises(ValueError, match="every K"):
        experiments.load("dto-consistency").Settings(ks=(1, 4))
    with pytest.raises(SystemExit):  # argparse: not among the choices
        _settings("pose-errors", ["--marginal", "some"])
