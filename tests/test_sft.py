"""``python -m training.sft``: JSONL validation, full and LoRA fine-tuning on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from training.sft import SftConfig, SftDataError, main, read_conversations, run_sft

GOOD = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I don't know, sorry."}]}
BAD_LINES = {
    2: "{not json",
    3: json.dumps({"text": "no messages"}),
    5: json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
    6: json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    7: json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
}


def _write(path, n_lines=8):
    lines = [BAD_LINES.get(n, json.dumps(GOOD)) for n in range(1, n_lines + 1)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    convs, problems = read_conversations(_write(tmp_path / "d.jsonl"))
    assert [n for n, _ in problems] == sorted(BAD_LINES)
    assert len(convs) == 8 - len(BAD_LINES)
    assert all(c == GOOD["messages"] for c in convs)


def test_strict_refuses_the_file_and_names_the_lines(tmp_path):
    with pytest.raises(SftDataError) as err:
        read_conversations(_write(tmp_path / "d.jsonl"), strict=True)
    assert all(f"line {n}:" in str(err.value) for n in BAD_LINES)


def test_missing_or_empty_data_fails_with_a_message(tmp_path):
    with pytest.raises(SftDataError, match="no such file"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SftDataError, match="no valid conversation"):
        read_conversations(tmp_path / "empty.jsonl")


def test_cli_skips_bad_lines_and_strict_refuses(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl")
    out = tmp_path / "sft"
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert all(f"line {n} skipped" in err for n in BAD_LINES)
    assert json.loads((out / "sft.json").read_text())["skipped_lines"] == sorted(BAD_LINES)
    strict_out = tmp_path / "strict"
    code = main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(strict_out), "--strict"])
    assert code == 2 and not strict_out.exists()
    assert "--strict" in capsys.readouterr().err


def test_full_sft_changes_weights_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    from training.models import load_model_and_tokenizer

    data = _write(tmp_path / "d.jsonl")
    run_sft(SftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "full"), steps=3, lr=1e-2), progress=False)
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    tuned, _ = load_model_and_tokenizer(tmp_path / "full")
    changed = [not torch.equal(p, q) for p, q in zip(base.parameters(), tuned.parameters(), strict=True)]
    assert all(changed)


def test_lora_sft_changes_only_the_adapter(tiny_model_dir, tmp_path):
    from training.models import load_lora, load_model_and_tokenizer

    data = _write(tmp_path / "d.jsonl")
    out = tmp_path / "lora"
    run_sft(SftConfig(model=str(tiny_model_dir), data=str(data), out=str(out), lora=True, steps=3, lr=1e-2), progress=False)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    policy = load_lora(base, out)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0, so training moved it
    for name, value in policy.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base_state:
            assert torch.equal(value, base_state[key]), name
