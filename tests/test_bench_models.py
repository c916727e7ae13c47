"""``python -m bench.models`` on the starter's shape: it builds the model, measures serving and a
round's work in child processes and prints rows with every figure (the figures themselves are
benchmarks, not asserted)."""

from __future__ import annotations

import json

FIGURES = ("chat_tokens_per_s", "ttft_s", "serving_memory_over_base", "s_per_64_ppo_answers",
           "round_peak_over_base", "base_mb")


def test_bench_models_prints_a_row_with_every_figure(tmp_path, capsys):
    from bench.models import architecture, main, word_tokenizer

    out = tmp_path / "rows.json"
    assert main(["--models", "starter", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                 "--json", str(out), "--workdir", str(tmp_path / "models")]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert all(isinstance(row[k], float | int) and row[k] > 0 for k in FIGURES), row
    assert row["versions_loaded"] == 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == [row]
    # the word-level tokenizer covers the model's whole vocabulary: every id decodes to text
    vocab = architecture("starter")["vocab_size"]
    tok = word_tokenizer("chatml", vocab)
    assert len(tok) == vocab and tok.decode([vocab - 40]).strip()
