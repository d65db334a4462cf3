import json
import os
import signal
import subprocess
import sys
import time

import pytest

from select2think import S2TError
from select2think.data.datasets import load_dataset, load_gsm_symbolic, refuse_test
from select2think.eval.grading import extract_answer, is_correct, last_boxed
from select2think.eval.runner import parse_policy
from select2think.eval.vote import majority, normalise, pass_at_k
from select2think.io import read_jsonl as read_lines


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{3", None),
    ],
)
def test_last_boxed_balances_braces(text, expected):
    assert last_boxed(text) == expected


def test_extraction_and_grading_cases():
    assert extract_answer("The total is 1,234 apples.") == "1234"
    assert extract_answer("no digits here") is None
    assert extract_answer("\\boxed{12} and later 99") == "12"
    assert is_correct("1,000", "1000")
    assert is_correct("\\frac{1}{2}", "0.5")
    assert is_correct("18 \\text{ dollars}", "18")
    assert is_correct("\\$18", "18")
    assert not is_correct("17", "18")
    assert not is_correct(None, "18")
    assert not is_correct("\\frac{", "18")  # unparseable: falls back to exact text, which differs


def test_majority_vote_normalises_and_breaks_ties_by_first():
    assert normalise("1,000.50") == "1000.5"
    assert majority(["3", "5", "5.0", "3"]) == "3"  # 2-2 tie: first occurrence
    assert majority([None, "7", "7 ", "8"]) == "7"
    assert majority([None, None]) is None
    assert pass_at_k(["1", "2"], "2") and not pass_at_k(["1", None], "2")


def test_datasets_and_test_split_refusal(tmp_path):
    g = load_dataset("gsm8k")
    assert len(g.items) == 1319 and g.items[0].answer == "18" and g.is_test
    with pytest.raises(S2TError, match="test split"):
        refuse_test(g, "calibration")
    assert len(load_dataset("aime2025").items) == 30
    train = {i.question for i in load_gsm_symbolic("train", limit=40).items}
    calib = {i.question for i in load_gsm_symbolic("calib", limit=10).items}
    assert len(train) == 40 and len(calib) == 10 and not train & calib
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"\n')
    with pytest.raises(S2TError, match=r"bad.jsonl:2: malformed JSON"):
        load_dataset(str(bad))
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"problem": "q"}\n')
    with pytest.raises(S2TError, match=r"m.jsonl:1: missing field 'question'"):
        load_dataset(str(missing))
    assert load_dataset(str(missing), question_field="problem").items[0].question == "q"
    solved = tmp_path / "train.jsonl"  # GSM8K's own format: the answer is a worked solution
    solved.write_text(
        '{"question": "q", "answer": "4 + 1 = 5 apples, so 1,005\\n#### 1,005"}\n{"question": "r", "answer": "7"}\n'
    )
    assert [i.answer for i in load_dataset(str(solved)).items] == ["1005", "7"]
    with pytest.raises(S2TError, match=r"pass the path of train\.jsonl"):
        load_dataset("gsm8k:train")


def test_policy_specs():
    assert parse_policy("maj@8").samples == 8
    assert parse_policy("s2t=runs/kl99.json").label == "s2t[kl99]"
    with pytest.raises(S2TError, match="needs a threshold file"):
        parse_policy("s2t")
    with pytest.raises(S2TError, match="unknown policy"):
        parse_policy("beam")


def test_parse_s2t_local_modes(tmp_path):
    thr = tmp_path / "ent.json"
    thr.write_text('{"trigger": "entropy", "threshold": 1.0}')
    coupled = parse_policy(f"s2t-local=runs/sel,{thr}")
    decoupled = parse_policy(f"s2t-local=runs/sel,{thr},decoupled")
    assert (coupled.local_mode, decoupled.local_mode) == ("coupled", "decoupled")
    assert coupled.label != decoupled.label and coupled.trigger == "entropy"
    with pytest.raises(S2TError, match="coupled\\|decoupled"):
        parse_policy(f"s2t-local=runs/sel,{thr},both")
    learned = tmp_path / "learned.json"
    learned.write_text('{"trigger": "learned", "threshold": 0.0}')
    other = parse_policy(f"s2t-local=runs/sel,{learned}")  # one selector, two triggers: two rows in one run
    assert (coupled.label, other.label) == ("s2t-local[sel,ent]", "s2t-local[sel,learned]")


def test_read_lines_ignores_a_partial_last_line_and_never_writes(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert read_lines(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3'


def _eval_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "select2think.cli",
        "eval",
        "--slm",
        "tiny-slm",
        "--llm",
        "tiny-llm",
        "--dataset",
        "gsm8k",
        "--limit",
        "6",
        "--max-new-tokens",
        "12",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--policy",
        "greedy",
        "--policy",
        "maj@2",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_resumes_after_sigkill_without_duplicates(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_eval_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.shard0of1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.is_file() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_lines(results)
    assert 3 <= len(before) < 12
    done = subprocess.run(_eval_cmd(out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = read_lines(results)
    keys = [(r["item"], r["policy"]) for r in after]
    assert len(keys) == len(set(keys)) == 12
    assert after[: len(before)] == before  # finished lines are never rewritten
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["policies"]) == {"greedy", "maj@2", "pass@2 (oracle, not a policy)"}
    assert (out / "accuracy_vs_compute.png").stat().st_size > 1000
    assert rep["policies"]["maj@2"]["compute_vs_greedy"] == pytest.approx(2.0, rel=0.35)


def test_shards_merge_into_the_unsharded_result(tmp_path):
    from select2think.cli import main
    from select2think.eval.report import build_report

    base = [
        "eval",
        "--slm",
        "tiny-slm",
        "--dataset",
        "gsm8k",
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--policy",
        "greedy",
        "--policy",
        "sample",
    ]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert main([*base, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/2", "--batch-size", "1"]) == 0
    whole = {
        (r["item"], r["policy"]): r["prediction"] for r in read_lines(tmp_path / "whole" / "results.shard0of1.jsonl")
    }
    sharded = {}
    for i in range(2):
        for r in read_lines(tmp_path / "sharded" / f"results.shard{i}of2.jsonl"):
            sharded[(r["item"], r["policy"])] = r["prediction"]
    assert whole == sharded and len(whole) == 8  # per-item seeds: shards and batch sizes agree with the whole run
    assert build_report(tmp_path / "sharded")["policies"]["greedy"]["n"] == 4
    # a third policy, first on a quarter, then on the whole: the second run skips what the first did
    more = [*base, "--policy", "maj@2", "--out", str(tmp_path / "sharded")]
    assert main([*more, "--shard", "1/4"]) == 0
    assert main(more) == 0
    everything = [
        (r["item"], r["policy"]) for f in (tmp_path / "sharded").glob("results.shard*.jsonl") for r in read_lines(f)
    ]
    assert len(everything) == len(set(everything)) == 12
    assert main([*base[:-2], "--policy", "greedy", "--out", str(tmp_path / "whole"), "--seed", "5"]) == 2


def test_report_prints_bracketed_policy_labels_verbatim(tmp_path, capsys):
    from select2think.cli import main

    stats = {
        "generated_tokens": 10,
        "slm_forwards": 10,
        "slm_tokens": 20,
        "llm_forwards": 1,
        "llm_tokens": 16,
        "triggers": 1,
        "flips": 1,
        "wall_time_s": 1.0,
    }
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "identity": {"dataset": "gsm8k", "slm": "a", "llm": "b", "max_new_tokens": 12},
                "policies": ["greedy", "s2t[kl99]"],
                "machine": "test",
            }
        )
    )
    lines = [
        {"item": f"q{i}", "policy": p, "correct": i == 0, "stats": stats}
        for i in range(2)
        for p in ("greedy", "s2t[kl99]")
    ]
    (tmp_path / "results.shard0of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| s2t[kl99] | 2 | 50.0%" in out
    # the config never recorded the LLM's size: S2T's compute is unknown ("-"), not free
    assert out.split("| s2t[kl99] |")[1].split("\n")[0].rstrip().endswith("| - |")


def test_a_resumed_run_without_the_llm_keeps_its_size_for_the_compute_column(tmp_path):
    from select2think.cli import main
    from select2think.eval.report import build_report

    base = [
        "eval",
        "--slm",
        "tiny-slm",
        "--llm",
        "tiny-llm",
        "--dataset",
        "gsm8k",
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--policy", "llm"]) == 0
    assert main([*base, "--policy", "greedy", "--batch-size", "1"]) == 0  # loads no LLM
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert set(cfg["models"]) == {"slm", "llm"} and cfg["models"]["llm"]["params"] > 0
    assert [(i["policies"], i["batch_size"]) for i in cfg["invocations"]] == [(["llm"], 8), (["greedy"], 1)]
    llm = build_report(tmp_path)["policies"]["llm"]
    assert llm["compute_vs_greedy"] > 0


def test_each_item_is_written_as_its_last_row_ends(tiny_pair, monkeypatch):
    """With more items than rows, items leave the batch one by one: a failure later in the run keeps them."""
    import select2think.eval.runner as runner
    from select2think.data.datasets import load_dataset
    from select2think.eval.runner import EvalConfig, parse_policy, run_policy_on_items

    items = load_dataset("gsm8k", limit=5).take(5)
    cfg = EvalConfig(slm="tiny-slm", llm=None, dataset="gsm8k", out="unused", max_new_tokens=10, batch_size=4)
    rows_done, written = [], []
    real = runner.generate

    def failing_after_six_rows(*a, on_finish, **kw):
        def hand_over(i, gen):
            if len(rows_done) == 6:
                raise RuntimeError("the machine went away")
            rows_done.append(i)
            on_finish(i, gen)

        return real(*a, on_finish=hand_over, **kw)

    monkeypatch.setattr(runner, "generate", failing_after_six_rows)
    with pytest.raises(RuntimeError, match="went away"):
        run_policy_on_items(tiny_pair, parse_policy("maj@2"), cfg, items, None, on_item=written.append)
    complete = {i // 2 for i in rows_done if rows_done.count(i - i % 2) + rows_done.count(i - i % 2 + 1) == 2}
    assert {r["item"] for r in written} == {items[n].id for n in complete} and written
    assert all(len(r["answers"]) == 2 and r["stats"]["wall_time_s"] >= 0 for r in written)


def test_exact_mcnemar():
    from select2think.eval.report import mcnemar

    assert mcnemar(1, 9) == pytest.approx(2 * 11 / 1024) == mcnemar(9, 1)  # P(X <= 1) for Bin(10, 1/2), twice
    assert mcnemar(15, 18) == pytest.approx(0.7283, abs=1e-4)  # scipy.stats.binomtest(15, 33).pvalue
    assert mcnemar(0, 0) == 1.0 and mcnemar(5, 5) == 1.0
