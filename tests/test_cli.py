"""The command line: complete help, one-line errors with exit code 2, a prune run on a tiny local model."""

import json

import pytest
from zoo import save_with_tokenizer, tiny_llama

from loraprune.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "/no/such/model"], "/no/such/model"),
    (["prune", "--ratio", "1.5", "--out", "OUT"], "ratio must be in"),
    (["prune", "--spread", "0.1", "--out", "OUT"], "needs scope='global'"),
    (["compile", "--scope", "global", "--spread", "-1", "--out", "OUT"], "spread must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_prune_tiny_local_model(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] <= report["params_before"]
    assert (out / "loraprune_plan.json").exists() and (out / "model.safetensors").exists()
    assert main(["prune", str(model_dir), "--ratio", "0.5", "--out", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("criterion, extra", [("taylor", []), ("random", []),
                                              ("lora", ["--steps", "2", "--data", "TEXT"])])
def test_prune_takes_every_criterion(criterion, extra, tmp_path):
    """lora and taylor read text: --data, or the default text (Python's reference docs)."""
    model_dir, out, text = tmp_path / "tiny", tmp_path / "out", tmp_path / "notes.txt"
    save_with_tokenizer(tiny_llama(layers=2), model_dir)
    text.write_text("\n\n".join(f"Paragraph {i}: " + "pruning keeps the heads that matter. " * 8 for i in range(40)))
    argv = ["prune", str(model_dir), "--criterion", criterion, "--ratio", "0.5", "--out", str(out)]
    assert main(argv + [str(text) if a == "TEXT" else a for a in extra]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == criterion and report["config"]["method"] == criterion
    assert report["params_after"] < report["params_before"] and report["verify"]["ok"]
    assert bool(report["history"]) == (criterion == "lora")  # the schedule's mask updates


def test_prune_with_a_text_criterion_and_no_tokenizer_is_one_line(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(model_dir)
    capsys.readouterr()
    assert main(["prune", str(model_dir), "--criterion", "taylor", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the model was read first: its loading bar stands above
    assert err[-1] == "loraprune prune: error: criterion 'taylor' needs text, and the model has no tokenizer"
    assert sum("error" in line for line in err) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_json_on_a_local_folder(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(model_dir)
    assert main(["inspect", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = sorted(g["kind"] for g in data["groups"])
    assert kinds == ["attention", "attention", "hidden", "mlp", "mlp"] and data["frozen"] == []


def test_inspect_shows_scores_written_onto_the_graph(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(model_dir)
    assert main(["inspect", str(model_dir), "--json", "--criterion", "magnitude"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["criterion"] == "magnitude"
    for g in data["groups"]:
        assert len(g["scores"]) == g["units"] and min(g["scores"]) >= 0
    assert main(["inspect", str(model_dir), "--criterion", "magnitude"]) == 0
    assert "lowest units" in capsys.readouterr().out


def test_an_interruption_wrapped_by_python_still_reads_as_interrupted(monkeypatch, capsys):
    """Python re-raises a KeyboardInterrupt that hits class creation (a lazy import under SIGTERM) as a
    RuntimeError; that is an interruption (exit 130), not a usage error."""
    import loraprune.cli as cli

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'r'") from err

    monkeypatch.setattr(cli, "cmd_inspect", interrupted_import)
    assert main(["inspect", "/no/such/model"]) == 130
    assert capsys.readouterr().err.strip() == "loraprune inspect: interrupted"
