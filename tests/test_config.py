"""The config refuses what the picked compress strategy would ignore (issue 28)."""

from __future__ import annotations

import pytest

from bpl.config import CUT_OPTIONS, STRATEGIES, resolve_config, strategy_of
from bpl.errors import BPLError

#: A value away from the default for each option of CUT_OPTIONS.
SET = {"flops_reduction": 0.5, "max_drop": 1.0, "prune_steps": 3, "soft": True,
       "accept_closest": True, "global_pruning": True, "soft_every": 2,
       "soft_partners": "masked", "from_scratch": True, "partners": False, "speedup": 2.0,
       "runtime": "torch", "latency_batch": 16, "latency_threads": 1}
#: What picks each strategy.
PICK = {"hard": {"flops_reduction": 0.5}, "steps": {"flops_reduction": 0.5, "prune_steps": 3},
        "budget": {"max_drop": 1.0}, "soft": {"flops_reduction": 0.5, "soft": True},
        "speed": {"speedup": 2.0, "runtime": "torch"}}


def test_every_cut_option_has_a_value_to_try():
    assert set(SET) == CUT_OPTIONS and set(PICK) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_strategy_takes_what_it_honours_and_refuses_the_rest(name):
    strategy = STRATEGIES[name]
    assert strategy_of(resolve_config(overrides=PICK[name])) is strategy
    for option in sorted(CUT_OPTIONS):
        given = {**PICK[name], option: SET[option]}
        if option in PICK[name]:
            continue
        if option in strategy.honours:
            assert strategy_of(resolve_config(overrides=given)) is strategy, option
        elif option not in {"soft", "max_drop", "speedup", "prune_steps"} or (
                (name, option) in {("soft", "max_drop"), ("soft", "speedup"),
                                   ("soft", "prune_steps"), ("budget", "speedup"),
                                   ("budget", "prune_steps"), ("speed", "prune_steps")}):
            # (soft, max_drop, speedup and prune_steps pick their own strategy, in that order)
            with pytest.raises(BPLError) as err:
                resolve_config(overrides=given)
            message = str(err.value)
            assert "\n" not in message and "--" + option.replace("_", "-") in message.replace(
                "--no-partners", "--partners"), (name, option, message)


def test_the_soft_refusals_name_the_reference_recipe():
    # Soft Filter Pruning alone is a soft run without partners; what partners do between
    # re-masks has no meaning then
    assert not resolve_config(overrides={"soft": True, "flops_reduction": 0.5,
                                         "partners": False}).partners
    with pytest.raises(BPLError, match="--no-partners trains none: leave out one of the two"):
        resolve_config(overrides={"soft": True, "flops_reduction": 0.5, "partners": False,
                                  "soft_partners": "masked"})
    with pytest.raises(BPLError, match="give one target"):
        resolve_config(overrides={"max_drop": 1.0, "flops_reduction": 0.5})


@pytest.mark.parametrize("option, value", [
    ("partner", "diverse"), ("init", "paper"), ("partner_share", 0.5), ("placement", "all"),
    ("diversity_weight", 0.1), ("granularity", "block"), ("diversity_compare", "functional")])
def test_no_partners_refuses_what_only_shapes_partners(option, value):
    """--partner diverse --no-partners trained no partner and said nothing; set at its
    default, an option is no contradiction (a shared config file may spell it out)."""
    flag = "--" + option.replace("_", "-")
    base = {"flops_reduction": 0.5, "partners": False}
    with pytest.raises(BPLError, match=f"^{flag} says how partners are made or trained, and "
                                       "--no-partners trains none: leave out one of the two$"):
        resolve_config(overrides={**base, option: value})
    assert not resolve_config(overrides={**base, "partner": "same", "init": "preserve"}).partners
    if option == "placement":  # soft without partners: which convs' groups are pruned
        assert resolve_config(overrides={**base, "soft": True, option: value}).placement == value


def test_compress_recovers_for_the_studys_30_epochs_unless_told(tmp_path):
    """`bpl compress`'s default length is its own (the convergence study's decision); a
    flag, a --config file and --epochs auto still win, and train keeps Config's."""
    from bpl.config import COMMAND_DEFAULTS, Config, resolve_command

    assert COMMAND_DEFAULTS["compress"] == {"epochs": 30}
    assert resolve_command("compress", {"flops_reduction": 0.5}).epochs == 30
    assert resolve_command("train").epochs == Config().epochs == 10
    assert resolve_command("compress", {"flops_reduction": 0.5, "epochs": 5}).epochs == 5
    assert resolve_command("compress", {"flops_reduction": 0.5, "epochs": "auto"}).epochs == "auto"
    file = tmp_path / "c.yaml"
    file.write_text("epochs: 7\nflops_reduction: 0.5\n")
    assert resolve_command("compress", None, file).epochs == 7
    # a run made with the old default resumes at the length it was started with
    run = tmp_path / "old"
    run.mkdir()
    saved = {"command": "compress", **Config(epochs=10, flops_reduction=0.5).to_dict("compress")}
    (run / "config.json").write_text(__import__("json").dumps(saved))
    assert resolve_command("compress", {"out": str(run), "resume": True}).epochs == 10
