"""Paired comparisons over seeds: the interval and the verdict follow from the per-seed differences."""

import json

import numpy as np
import pytest

from training.claims import masking_check, paired, verdict, write_claims
from training.plan import plan
from training.tables import Results, write_tables


def _report(tmp_path, rid, accuracies, name="eval", n=10000):
    """Write run ``rid``'s report ``name``.json under tmp_path/runs with the given accuracies (%)."""
    run = tmp_path / "runs" / rid
    run.mkdir(parents=True, exist_ok=True)
    (run / f"{name}.json").write_text(json.dumps({"n_examples": n, "attacks": {
        attack: {"accuracy": value / 100} for attack, value in accuracies.items()}}))


def _results(tmp_path, bcs, fixed, seeds=3):
    """Results of the quick plan where at/bcs_c0.01 and at/fixed_c0.01 have the given PGD-50 accuracies (%)."""
    the_plan = plan(("bcs",), "fashion_mnist", "quick", seeds=seeds)
    for group, values in (("at/bcs_c0.01", bcs), ("at/fixed_c0.01", fixed)):
        for seed, value in enumerate(values):
            _report(tmp_path, f"{group}_s{seed}", {"pgd50": value, "clean": 80.0})
    return the_plan, Results(the_plan, tmp_path / "runs")


@pytest.mark.parametrize("bcs,fixed,expected", [
    ([72.0, 73.1, 71.9], [70.0, 71.0, 70.2], "held"),
    ([68.0, 69.1, 67.9], [70.0, 71.0, 70.2], "contradicted"),
    ([72.0, 69.0, 71.0], [70.0, 71.0, 70.5], "not shown"),
])
def test_verdict_follows_the_paired_interval(tmp_path, bcs, fixed, expected):
    _, results = _results(tmp_path, bcs, fixed)
    n, mean, low, high = paired(results, "at/bcs_c0.01", "at/fixed_c0.01", "pgd50")
    assert n == 3 and mean == pytest.approx(sum(bcs) / 3 - sum(fixed) / 3)
    assert low < mean < high
    assert verdict((n, mean, low, high)) == expected


def test_pairing_is_by_seed_not_by_rank(tmp_path):
    # unpaired, the two groups overlap; paired, BCS leads by exactly 1 point on every seed
    _, results = _results(tmp_path, [61.0, 71.0, 81.0], [60.0, 70.0, 80.0])
    n, mean, low, high = paired(results, "at/bcs_c0.01", "at/fixed_c0.01", "pgd50")
    assert (n, mean) == (3, pytest.approx(1.0)) and low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_a_closeness_claim_uses_its_margin_and_one_seed_shows_nothing(tmp_path):
    _, results = _results(tmp_path, [69.0, 69.2, 68.9], [70.0, 70.1, 70.0])
    measured = paired(results, "at/bcs_c0.01", "at/fixed_c0.01", "pgd50")
    assert verdict(measured) == "contradicted" and verdict(measured, margin=3.0) == "held"
    _, one = _results(tmp_path / "one", [72.0], [70.0], seeds=1)
    assert verdict(paired(one, "at/bcs_c0.01", "at/fixed_c0.01", "pgd50")).startswith("not shown")


def test_claims_md_lists_the_measured_claim_with_its_runs_and_epochs(tmp_path):
    the_plan, results = _results(tmp_path, [72.0, 73.1, 71.9], [70.0, 71.0, 70.2])
    text = write_claims(results, ("bcs",), tmp_path / "claims.md").read_text()
    row = next(line for line in text.splitlines() if "AT 99%: BCS > Fixed | papers' | at/" in line and "PGD-50" in line)
    assert "at/bcs_c0.01 (5) − at/fixed_c0.01 (10)" in row and row.rstrip(" |").endswith("held")
    summary = next(line for line in text.splitlines() if line.startswith("| AT 99%: BCS > Fixed | papers' | 5 vs 10"))
    assert summary == ("| AT 99%: BCS > Fixed | papers' | 5 vs 10 | 3 | +0.0 [+0.0, +0.0] | +1.9 [+1.4, +2.5] | — | "
                       "not shown: clean; held: PGD-50 |")  # the same clean accuracy: a zero-width interval at 0
    written = write_tables(("bcs",), the_plan, tmp_path)
    assert tmp_path / "claims.md" in written


def test_a_cell_with_only_some_of_its_seeds_says_how_many(tmp_path):
    the_plan, results = _results(tmp_path, [72.0, 73.0], [70.0, 71.0, 70.2])
    assert results.cell("at/bcs_c0.01", "pgd50") == "72.5 ± 0.7 [2 of 3 seeds]"
    assert results.triple("at/bcs_c0.01") == "80.0 ± 0.0 / 72.5 ± 0.7 [2 of 3 seeds]"
    assert results.triple("at/fixed_c0.01") == "80.0 ± 0.0 / 70.4 ± 0.5"
    write_tables(("bcs",), the_plan, tmp_path)
    table = (tmp_path / "table_bcs.md").read_text()
    assert "72.5 ± 0.7 [2 of 3 seeds] (5)" in table and "70.4 ± 0.5 (10)" in table


def test_a_masking_claim_compares_the_gap_between_two_attacks_seed_by_seed(tmp_path):
    # HYDRA's FGSM − PGD-50 gap is 5 points above BCS's on every seed, though its PGD-50 is the higher one
    the_plan = plan(("hydra",), "fashion_mnist", "quick", seeds=3)
    for group, fgsm, pgd in (("at/hydra_c0.01", [80.0, 79.0, 81.0], [70.0, 69.0, 71.0]),
                             ("at/bcs_c0.01", [70.0, 69.5, 70.5], [65.0, 64.5, 65.5])):
        for seed, (f, g) in enumerate(zip(fgsm, pgd)):
            _report(tmp_path, f"{group}_s{seed}", {"fgsm": f, "pgd50": g, "pgd100": g})
    results = Results(the_plan, tmp_path / "runs")
    n, mean, low, high = paired(results, "at/hydra_c0.01", "at/bcs_c0.01", "fgsm-pgd50")
    assert (n, mean, low, high) == (3, pytest.approx(5.0), pytest.approx(5.0), pytest.approx(5.0))
    assert verdict(paired(results, "at/hydra_c0.01", "at/bcs_c0.01", "pgd50-pgd100")) == "not shown"
    text = write_claims(results, ("hydra",), tmp_path / "claims.md").read_text()
    row = next(line for line in text.splitlines() if "AT 99%: HYDRA's gradient-masking" in line and "(11) −" in line)
    assert "| FGSM − PGD-50 gap |" in row and row.rstrip(" |").endswith("held") and "FGSM 88.8 vs PGD-50 43.9" in text
    assert "| held: FGSM − PGD-50 gap; not shown: PGD-50 − PGD-100 gap |" in text  # the claim-by-claim table


def test_a_gap_with_an_attack_run_on_fewer_images_is_read_on_those_images_only(tmp_path):
    # PGD-50 on all images 70 (HYDRA) and 72 (BCS); on AutoAttack's first images 66 and 73, where B&B leaves 64 and
    # 72: the PGD-50 − B&B gaps are 2 and 1 there (mixing the two sets would give 6 and 0)
    the_plan = plan(("hydra",), "fashion_mnist", "quick", seeds=3)
    for group, pgd_all, pgd_first, bb in (("at/hydra_c0.01", 70.0, 66.0, 64.0), ("at/bcs_c0.01", 72.0, 73.0, 72.0)):
        for seed in range(3):
            _report(tmp_path, f"{group}_s{seed}", {"pgd50": pgd_all})
            first = {"pgd50": pgd_first, "bb": bb}
            if seed == 2:  # a report without PGD-50 on these images: no gap of this seed
                first.pop("pgd50")
            _report(tmp_path, f"{group}_s{seed}", first, name="eval_aa", n=1000)
    results = Results(the_plan, tmp_path / "runs")
    assert results.gap_by_seed("at/hydra_c0.01", "pgd50", "bb") == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}
    n, mean, low, high = paired(results, "at/hydra_c0.01", "at/bcs_c0.01", "pgd50-bb")
    assert (n, mean) == (2, pytest.approx(1.0))
    assert results.by_seed("at/hydra_c0.01", "pgd50") == {s: pytest.approx(70.0) for s in range(3)}  # tables: all


def test_a_run_whose_gradients_mislead_the_attacks_is_listed_and_a_sound_one_is_not(tmp_path):
    the_plan, results = _results(tmp_path, [70.0, 71.0, 70.5], [70.0, 71.0, 70.2])
    # PGD-50 70.0, 71.0, 70.0: AA 18 points below it; sound; AA 8 below, but Square takes 6 after APGD-T
    for rid, apgd_t, aa in (("at/bcs_c0.01_s0", 0.53, 0.52), ("at/bcs_c0.01_s1", 0.69, 0.69),
                            ("at/fixed_c0.01_s0", 0.68, 0.62)):
        after = {"clean": 0.8, "apgd-ce": 0.7, "apgd-t": apgd_t, "square": aa}
        (tmp_path / "runs" / rid / "eval_aa.json").write_text(json.dumps({"n_examples": 1000, "attacks": {
            "autoattack": {"accuracy": aa, "after": after}}}))
    text = "\n".join(masking_check(results))
    assert text.startswith("3 runs with AutoAttack checked")
    assert "| at/bcs_c0.01_s0 | — | 70.0 | 52.0 |" in text and "| at/fixed_c0.01_s0 |" in text
    assert "at/bcs_c0.01_s1" not in text
    # with PGD-50 repeated on AutoAttack's images, the check reads it there: 0.53 is 1 point below 0.54, not listed
    aa = json.loads((tmp_path / "runs" / "at/bcs_c0.01_s0" / "eval_aa.json").read_text())
    aa["attacks"].update(pgd50={"accuracy": 0.53}, fgsm={"accuracy": 0.6})
    aa["attacks"]["autoattack"]["after"].update({"apgd-t": 0.525})
    (tmp_path / "runs" / "at/bcs_c0.01_s0" / "eval_aa.json").write_text(json.dumps(aa))
    assert "at/bcs_c0.01_s0" not in "\n".join(masking_check(results))


def test_a_drop_that_the_learned_topologies_share_is_not_read_as_randoms_collapse(tmp_path):
    # small_cnn under natural training at 99%: Random 4 points below dense, and BCS and Fixed just as far.
    the_plan = plan(("bcs",), "fashion_mnist", "quick", seeds=3)
    clean = {"natural/dense": [92.2, 92.4, 92.3], "natural/random_c0.01": [88.0, 88.5, 88.1],
             "natural/bcs_c0.01": [88.1, 88.3, 88.0], "natural/fixed_c0.01": [88.3, 88.6, 88.2]}
    for group, values in clean.items():
        for seed, value in enumerate(values):
            _report(tmp_path, f"{group}_s{seed}", {"clean": value, "pgd50": 0.0})
    text = write_claims(Results(the_plan, tmp_path / "runs"), ("bcs",), tmp_path / "claims.md").read_text()
    summary = [line.split(" | ") for line in text.splitlines() if line.startswith("| natural training 99%")]
    rows = {cells[0].lstrip("| "): cells[-1].rstrip(" |") for cells in summary if " vs " in cells[2]}
    assert rows == {"natural training 99%: Random collapses, below dense (dense − Random, clean)": "held",
                    "natural training 99%: Random collapses, below BCS (BCS − Random, clean)": "not shown",
                    "natural training 99%: Random collapses, below Fixed (Fixed − Random, clean)": "not shown"}


def test_the_sparsity_figure_plots_each_methods_seed_mean_and_the_matched_controls(tmp_path):
    from training.tables import sparsity_figure, sparsity_series

    the_plan = plan(("sparsity",), "fashion_mnist", "quick", seeds=3)
    for seed, (fixed, bcs6, dense, dense6) in enumerate([(70.0, 71.0, 69.0, 72.0), (72.0, 74.0, 70.0, 73.0),
                                                         (71.0, 71.0, 71.0, 74.0)]):
        _report(tmp_path, f"at/fixed_c0.01_e3_s{seed}", {"pgd50": fixed, "clean": 80.0})
        _report(tmp_path, f"at/bcs_c0.01_e6_s{seed}", {"pgd50": bcs6, "clean": 80.0})
        _report(tmp_path, f"at/dense_e3_s{seed}", {"pgd50": dense, "clean": 84.0})
        _report(tmp_path, f"at/dense_e6_s{seed}", {"pgd50": dense6, "clean": 84.0})
    _report(tmp_path, "at/hydra_c0.1_e3_s0", {"pgd50": 75.0, "clean": 83.0})
    results = Results(the_plan, tmp_path / "runs")
    lines, series = sparsity_series(results, "pgd50")
    assert lines == [("dense (3 epochs)", pytest.approx(70.0), 3), ("dense (6 epochs)", pytest.approx(73.0), 3)]
    by_label = {label: (matched, list(conns), mean, std, seeds) for label, matched, conns, mean, std, seeds in series}
    matched, conns, mean, std, seeds = by_label["Fixed (one-shot adversarial pruning)"]
    at = conns.index(0.01)
    assert not matched and mean[at] == pytest.approx(71.0) and std[at] == pytest.approx(1.0) and seeds[at] == 3
    matched, conns, mean, std, seeds = by_label["BCS, 6 epochs (matched to Fixed)"]
    assert matched and mean[at] == pytest.approx(72.0) and seeds[at] == 3
    _, conns, mean, std, seeds = by_label["HYDRA"]
    assert mean[conns.index(0.1)] == pytest.approx(75.0) and std[conns.index(0.1)] == 0.0 and np.isnan(mean[at])
    sparsity_figure(results, tmp_path / "sparsity.png")
    assert (tmp_path / "sparsity.png").stat().st_size > 10_000


def test_the_sparsity_tables_iwi_rows_sit_under_their_own_heading(tmp_path):
    from training.tables import sparsity_table

    the_plan = plan(("sparsity",), "fashion_mnist", "quick", seeds=3)
    _report(tmp_path, "at/iwi_x2_e3_s0", {"pgd50": 75.4, "clean": 84.8})
    _report(tmp_path, "at/fixed_c0.01_natsrc_e3_s0", {"pgd50": 62.0, "clean": 74.2})
    text = sparsity_table(Results(the_plan, tmp_path / "runs"))
    sections = {part.splitlines()[0]: part for part in text.split("\n## ")[1:]}
    assert "IWI from the small network" in sections["Inverse weights inheritance"]
    assert "natural pruning" in sections["Adversarial vs natural pruning"]
    assert "IWI" not in sections["Adversarial vs natural pruning"]
