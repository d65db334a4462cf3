import json

import pytest
import torch

from select2think.analysis.sufficiency import AnalyzeConfig, analyze_problems, run_analysis
from select2think.decoding.triggers import KLTrigger
from select2think.decoding.vocab import Vocab
from select2think.models.chat import encode_prompts


def test_one_forward_statistics_match_a_slow_per_token_computation(tiny_pair):
    ids = encode_prompts(tiny_pair.tokenizer, ["What is 2+2?"], True)[0]
    (rec,) = analyze_problems(tiny_pair, [ids], "slm", max_new_tokens=10)
    gen = rec["tokens"]
    assert gen == rec["slm_argmax"]  # greedy SLM trajectory: its own argmax at every step
    slm, llm = tiny_pair.slm.spawn(), tiny_pair.llm.spawn()
    text = Vocab.of(tiny_pair).text_logits
    for b in (slm, llm):
        b.reset(1)
    s_logits = text(slm.extend(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[:, -1])
    l_logits = text(llm.extend(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[:, -1])
    for t, tok in enumerate(gen):
        s_lp, l_lp = s_logits.log_softmax(-1), l_logits.log_softmax(-1)
        top = s_lp.topk(64).indices[0].tolist()
        arg = int(l_lp.argmax())
        assert rec["llm_argmax"][t] == arg
        assert rec["llm_rank"][t] == (top.index(arg) if arg in top else -1)
        assert rec["kl_sl"][t] == pytest.approx(KLTrigger().statistic(s_lp, l_lp).item(), rel=1e-3, abs=1e-5)
        step = torch.tensor([[tok]])
        s_logits = text(slm.extend(step, torch.ones(1, 1, dtype=torch.bool))[:, -1])
        l_logits = text(llm.extend(step, torch.ones(1, 1, dtype=torch.bool))[:, -1])


def test_analysis_run_writes_outputs_and_resumes(tmp_path):
    cfg = AnalyzeConfig(
        slm="tiny-slm",
        llm="tiny-llm",
        dataset="gsm_symbolic:dev",
        out=str(tmp_path),
        limit=3,
        max_new_tokens=12,
        dtype="fp32",
        device="cpu",
    )
    summary = run_analysis(cfg, progress=False)
    assert summary["problems"] == 3 and summary["steps"] == 3 * (12 - 3)
    d = summary["definitions"]
    assert d["kl_top10%"]["divergence_rate"] == pytest.approx(0.1, abs=0.05)
    curve = d["all_steps"]["hit_curve"]
    assert all(curve[k] <= curve[k + 1] for k in range(1, 64))  # Hit@K is monotone in K
    for name in ("summary.json", "hit_at_k.csv", "hit_at_k.png", "rank_histogram.png", "kl_vs_rank.png"):
        assert (tmp_path / name).stat().st_size > 0
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    again = run_analysis(cfg, progress=False)
    assert (tmp_path / "steps.jsonl").read_text().splitlines() == lines and again["steps"] == summary["steps"]
    assert json.loads(lines[0])["top_ids"][0].__len__() == 64
