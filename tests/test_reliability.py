"""Bad input, damaged artifacts and interrupted runs: one `error:` line and exit 2, never a traceback;
readers never write; resumes cut only a torn last line; a second writer is refused; no pickle runs."""

import json
import math
import os
import pickle

import pytest

from select2think import S2TError
from select2think.cli import main
from select2think.io import (
    atomic_path,
    atomic_write,
    check_safetensors,
    open_resume,
    read_jsonl,
    run_lock,
    write_json,
)

TINY = ["--dtype", "fp32", "--device", "cpu"]
KL = {"trigger": "kl", "threshold": 0.5, "slm": "tiny-slm", "llm": "tiny-llm", "reverse_kl": False}


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _fake_gguf_cache(tmp_path, monkeypatch, weights: bytes | None):
    """A local .gguf whose cached conversion exists but whose weights are damaged (None: missing)."""
    from select2think.models.cache import converted_dir
    from select2think.models.registry import resolve

    monkeypatch.setenv("S2T_CACHE", str(tmp_path / "cache"))
    gguf = _write(tmp_path / "m.gguf", b"GGUF" + b"\0" * 64)
    conv = converted_dir(resolve(gguf), "fp32")
    _write(conv / "config.json", "{}")
    _write(conv / "s2t_source.json", "{}")
    if weights is not None:
        _write(conv / "model.safetensors", weights)
    return gguf


def _thr(tmp_path, **changes):
    return _write(tmp_path / "thr.json", json.dumps({**KL, **changes}))


def _dataset(tmp_path, rows):
    return _write(tmp_path / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _eval(tmp_path, *args, dataset="gsm8k"):
    out = str(tmp_path / "run")
    return ["eval", "--slm", "tiny-slm", "--dataset", dataset, "--max-new-tokens", "4", "--out", out, *TINY, *args]


def _gen(*args):
    return ["generate", "What is 2+2?", "--slm", "tiny-slm", "--max-new-tokens", "4", *TINY, *args]


CASES = {
    "empty .gguf": lambda t, m: ["generate", "hi", "--slm", _write(t / "e.gguf", b""), *TINY],
    "truncated .gguf": lambda t, m: ["generate", "hi", "--slm", _write(t / "t.gguf", b"GGUF\3\0\0\0\1"), *TINY],
    "truncated cached safetensors": lambda t, m: [
        "generate",
        "hi",
        "--slm",
        _fake_gguf_cache(t, m, b'\x40\0\0\0\0\0\0\0{"a"'),
        *TINY,
    ],
    "missing cached safetensors": lambda t, m: ["generate", "hi", "--slm", _fake_gguf_cache(t, m, None), *TINY],
    "threshold is a string": lambda t, m: _gen(
        "--llm", "tiny-llm", "--policy", "s2t", "--threshold-file", _thr(t, threshold="0.5")
    ),
    "threshold is null": lambda t, m: _gen(
        "--llm", "tiny-llm", "--policy", "s2t", "--threshold-file", _thr(t, threshold=None)
    ),
    "threshold is NaN": lambda t, m: _gen(
        "--llm", "tiny-llm", "--policy", "s2t", "--threshold-file", _thr(t, threshold=math.nan)
    ),
    "threshold file not UTF-8": lambda t, m: _gen(
        "--llm", "tiny-llm", "--policy", "s2t", "--threshold-file", _write(t / "bad.json", b'{"a": "\xff"}')
    ),
    "non-UTF-8 prompt": lambda t, m: ["generate", "2+2\udcff?", "--slm", "tiny-slm", *TINY],
    "non-UTF-8 dataset line": lambda t, m: _eval(
        t, dataset=_write(t / "d.jsonl", b'{"question": "q", "answer": "1"}\n{"question": "\xff", "answer": "2"}\n')
    ),
    "s2t=missing.json": lambda t, m: _eval(t, "--llm", "tiny-llm", "--policy", f"s2t={t / 'missing.json'}"),
    "s2t-local=missingdir,thresholds": lambda t, m: _eval(
        t, "--policy", f"s2t-local={t / 'missingdir'},{_thr(t, trigger='entropy', llm='')}"
    ),
    "s2t-local=missingdir": lambda t, m: _eval(t, "--policy", f"s2t-local={t / 'missingdir'}"),
    "--limit -1": lambda t, m: _eval(t, "--limit", "-1"),
    "--threshold nan": lambda t, m: _gen("--llm", "tiny-llm", "--policy", "s2t", "--threshold", "nan"),
    "item with no answer": lambda t, m: _eval(
        t, dataset=_dataset(t, [{"question": "q", "answer": "1"}, {"question": "q2"}])
    ),
    "null question": lambda t, m: _eval(t, dataset=_dataset(t, [{"question": None, "answer": "1"}])),
    "duplicate item ids": lambda t, m: _eval(
        t,
        dataset=_dataset(t, [{"id": "a", "question": "q", "answer": "1"}, {"id": "a", "question": "r", "answer": "2"}]),
    ),
    "empty dataset": lambda t, m: _eval(t, dataset=_write(t / "empty.jsonl", "")),
    "s2t thresholds but no --llm": lambda t, m: _gen("--policy", "s2t", "--threshold-file", _thr(t)),
    "report on a malformed line mid-file": lambda t, m: ["report", _bad_run(t)],
}


def _bad_run(t):
    _write(t / "run" / "config.json", json.dumps({"identity": {}, "policies": []}))
    _write(t / "run" / "results.shard0of1.jsonl", '{"item": "a"}\n{"item": \n{"item": "c"}\n')
    return str(t / "run")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    argv = CASES[case](tmp_path, monkeypatch)
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "not None" not in err[0]


def test_missing_threshold_file_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import select2think.backends as pair_mod

    def no_models(*a, **k):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr(pair_mod, "load_pair", no_models)
    for policy in (f"s2t={tmp_path / 'missing.json'}", f"s2t-local={tmp_path / 'nodir'},{_thr(tmp_path)}"):
        assert main(_eval(tmp_path, "--llm", "tiny-llm", "--policy", policy)) == 2
        assert "not found" in capsys.readouterr().err


def test_readers_never_write_and_name_the_bad_line(tmp_path, capsys):
    run = _bad_run(tmp_path)
    path = tmp_path / "run" / "results.shard0of1.jsonl"
    before = path.read_bytes()
    assert main(["report", run]) == 2
    assert "results.shard0of1.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert path.read_bytes() == before
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert read_jsonl(torn) == [{"a": 1}, {"a": 2}]
    assert torn.read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a"'


def test_resume_cuts_only_a_torn_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3')
    with open_resume(p) as f:
        f.write(json.dumps({"a": 4}) + "\n")
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}, {"a": 4}]
    p.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(S2TError, match=r"r.jsonl:2: malformed JSON"):
        open_resume(p)
    assert p.read_bytes() == b'{"a": 1}\n{"a": \n{"a": 3}\n'  # a bad line mid-file is never cut


def test_a_second_writer_is_refused(tmp_path, capsys):
    with run_lock(tmp_path / "run"):
        with pytest.raises(S2TError, match="in use by another s2t process"), run_lock(tmp_path / "run"):
            pass
        assert main(_eval(tmp_path, "--limit", "1")) == 2
    assert "in use by another" in capsys.readouterr().err
    with run_lock(tmp_path / "run"):  # released
        pass


class _Plant:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_training_state_is_never_unpickled(tmp_path, capsys):
    out = tmp_path / "sel"
    out.mkdir()
    marker = tmp_path / "pwned"
    (out / "train_state.pt").write_bytes(pickle.dumps({"optimizer": _Plant(str(marker))}))
    groups = _write(tmp_path / "g" / "groups.jsonl", json.dumps({"item": "a", "groups": [_group()]}) + "\n")
    argv = ["train", "--slm", "tiny-slm", "--groups", os.path.dirname(groups), "--out", str(out), *TINY[2:]]
    assert main(argv) == 2
    assert "never loaded" in capsys.readouterr().err
    assert not marker.exists()


def _group(step=0):
    return {
        "step": step,
        "context": [1, 2, 3, 4, 5],
        "candidates": list(range(100, 116)),
        "llm_probs": [0.5] + [0.5 / 15] * 15,
        "slm_probs": [0.4] + [0.6 / 15] * 15,
    }


def test_train_resume_refuses_other_settings_and_a_truncated_adapter(tmp_path, capsys):
    rows = [{"item": f"i{i}", "groups": [_group(0), _group(1)]} for i in range(4)]
    groups = tmp_path / "g"
    _write(groups / "groups.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "--slm", "tiny-slm", "--groups", str(groups), "--out", str(tmp_path / "sel"), "--dtype", "fp32"]
    base += ["--device", "cpu", "--epochs", "1", "--lora-r", "2"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base[:-2], "--lora-r", "4"]) == 2
    assert "lora_r: 2 -> 4" in capsys.readouterr().err
    assert main([*base[:-4], "--epochs", "2", "--lora-r", "2", "--lr", "1e-3"]) == 2
    assert "lr: 0.0002 -> 0.001" in capsys.readouterr().err
    adapter = tmp_path / "sel" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert main([*base[:-4], "--epochs", "2", "--lora-r", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_model.safetensors is" in err[0]


def test_collect_refuses_to_mix_groups_from_another_threshold(tmp_path, capsys):
    out = tmp_path / "groups"
    write_json(out / "collect.json", {"identity": {"threshold_file": "0" * 64}})
    argv = ["collect", "--slm", "tiny-slm", "--llm", "tiny-llm", "--threshold-file", _thr(tmp_path), "--out", str(out)]
    assert main([*argv, "--limit", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "threshold_file" in err


def test_eval_refuses_results_of_a_recalibrated_same_named_threshold_file(tmp_path, capsys):
    thr = _thr(tmp_path)
    argv = _eval(tmp_path, "--llm", "tiny-llm", "--policy", f"s2t={thr}", "--limit", "1")
    assert main(argv) == 0
    rows = read_jsonl(tmp_path / "run" / "results.shard0of1.jsonl")
    assert len(rows) == 1 and rows[0]["inputs"]
    assert main(argv) == 0  # same content: resumes, nothing to do
    _thr(tmp_path, threshold=0.7)
    capsys.readouterr()
    assert main(argv) == 2
    assert "sha256 changed" in capsys.readouterr().err


def test_eval_refuses_to_resume_on_an_edited_dataset_file(tmp_path, capsys):
    data = _dataset(tmp_path, [{"question": "1+1?", "answer": "2"}])
    argv = _eval(tmp_path, "--policy", "greedy", dataset=data)
    assert main(argv) == 0
    assert "1/1 done" in capsys.readouterr().err  # a plain progress line, stdout not being a terminal
    _dataset(tmp_path, [{"question": "2+2?", "answer": "4"}])
    capsys.readouterr()
    assert main(argv) == 2
    assert "changed content" in capsys.readouterr().err


def test_long_prompts_warn(tiny_pair, capsys):
    from select2think.data.datasets import Item
    from select2think.eval.runner import warn_long_prompts

    old = tiny_pair.slm.context_length
    tiny_pair.slm.context_length = 80
    try:
        warn_long_prompts(tiny_pair, [Item("a", "word " * 50, "1"), Item("b", "hi", "1")], 8)
    finally:
        tiny_pair.slm.context_length = old
    assert "warning: 1 of 2 prompts" in capsys.readouterr().err


def test_atomic_writes_use_fresh_names_and_never_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "out.json.tmp").symlink_to(victim)
    atomic_write(tmp_path / "out.json", "new")
    assert victim.read_text() == "keep" and (tmp_path / "out.json").read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp", "victim"]


def test_cached_gguf_is_reverified_and_leftovers_cleaned(tmp_path, monkeypatch):
    from select2think.io import sha256_of
    from select2think.models import cache

    monkeypatch.setenv("S2T_CACHE", str(tmp_path / "cache"))
    parts = [_write(tmp_path / f"p{i}", bytes([i]) * 1000) for i in range(3)]
    dest = tmp_path / "cache" / "gguf" / "m.gguf"
    _write(dest.parent / ".m.gguf.abc123.tmp", b"left by a kill")
    cache.clean_tmp(dest)
    assert list(dest.parent.iterdir()) == []
    cache.assemble([__import__("pathlib").Path(p) for p in parts], dest, None)
    good = sha256_of(dest)
    assert cache.verify(dest, good, 3000, "hint") == good
    with open(dest, "r+b") as f:  # zeros in the middle, same size
        f.seek(1000)
        f.write(b"\0" * 500)
    with pytest.raises(S2TError, match=r"corrupt.*fetch m --force"):
        cache.verify(dest, good, 3000, cache.force_hint("m"))


def test_check_safetensors_catches_truncation(tmp_path):
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4, 4)}, p)
    check_safetensors(p)
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(S2TError, match="bytes, its header says"):
        check_safetensors(p)


def test_models_list_in_a_pipe_prints_whole_names(capsys):
    from select2think.models.registry import REGISTRY

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert f"\n{name}\t" in out


def test_progress_off_a_terminal_logs_plain_lines(monkeypatch):
    import io

    from select2think import progress

    clock = iter([0.0, 0.0, 10.0, 31.0, 62.0, 62.0, 62.0, 62.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    buf = io.StringIO()
    with progress.Progress("eval x", 10, 0, stream=buf) as p:
        p.advance(2)  # t=10: quiet
        p.advance(2)  # t=31: a line
    lines = buf.getvalue().splitlines()
    assert lines[0] == "eval x: 0/10 done, starting"
    assert lines[1].startswith("eval x: 4/10 done,") and "left" in lines[1]
    assert lines[-1].startswith("eval x: 4/10 done in")


def test_fetch_force_removes_a_damaged_conversion_and_rebuilds(tmp_path, monkeypatch, capsys):
    from select2think.models.cache import converted_dir
    from select2think.models.registry import resolve

    gguf = _fake_gguf_cache(tmp_path, monkeypatch, b"\x40\0\0\0\0\0\0\0{")
    assert main(["models", "fetch", gguf, "--dtype", "fp32"]) == 2
    assert "--force" in capsys.readouterr().err
    _write(converted_dir(resolve(gguf), "fp32").parent / ".fp32.dead.tmp" / "x", b"left by a kill")
    assert main(["models", "fetch", gguf, "--dtype", "fp32", "--force"]) == 2  # rebuilt from a fake GGUF: fails
    assert "cannot read GGUF file" in capsys.readouterr().err
    assert not converted_dir(resolve(gguf), "fp32").exists()
    assert not list(converted_dir(resolve(gguf), "fp32").parent.iterdir())  # the killed build's leftovers too


def test_tables_get_room_off_a_terminal():
    from select2think.cli import console

    assert console.width >= 200  # pytest's stdout is not a terminal: the demo's table is not cut at 80


@pytest.mark.parametrize(
    "argv,says",
    [
        (["eval", "--limit", "1"], "--out"),
        (["eval", "--out", "x", "--no-such-option"], "--no-such-option"),
        (["eval", "--out", "x", "--limit", "many"], "--limit"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0] and "s2t" in err[0], err
