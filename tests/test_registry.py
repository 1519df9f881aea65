"""Registry promotion against a real MLflow SQLite store: the gate, aliases, manual promotion."""
import json

import mlflow
import pytest
import torch

from convheads import ConvHeadsError, load_model, save_model
from tasks.config import validate
from tasks.registry import CHALLENGER, CHAMPION, client_for, gate, load_champion, register, set_champion
from tasks.runner import execute, output_dir
from tasks.pipeline import STAGES
from tasks.tracking import LOGGED_MODELS, log_model, pipeline_run
from conftest import tiny_params


def test_the_gate_gives_a_reason_for_every_check():
    cfg = validate({**tiny_params("/tmp/x"), "registry": {"max_top1_drop": 0.02, "min_speedup": 1.1}})
    ok = gate(top1=0.95, top1_drop=0.01, speedup=1.2, champion_top1=0.94, cfg=cfg)
    assert ok.promoted and ok.reasons == [
        "top-1 drop 1.00 pts <= max 2.00 pts", "speedup 1.200x (batch 4) >= min 1.100x",
        "top-1 0.9500 > champion's 0.9400 on the same test data"]
    assert not gate(0.95, 0.03, 1.2, None, cfg).promoted
    assert not gate(0.95, 0.01, 1.05, None, cfg).promoted
    tie = gate(0.94, 0.01, 1.2, 0.94, cfg)
    assert not tie.promoted and tie.reasons[-1] == "top-1 0.9400 <= champion's 0.9400 on the same test data"
    assert gate(0.95, 0.01, 1.2, None, cfg).reasons[-1] == "no current champion"


@pytest.fixture
def pipeline(finished_pipeline):
    """The tiny pipeline's outputs, with a gate that looks at accuracy (speed is noise at this size)."""
    cfg = validate({**tiny_params(finished_pipeline), "registry": {"min_speedup": 0.01, "max_top1_drop": 0.5}})
    assert all(execute(stage, cfg).skipped for stage in STAGES.values())  # the copy is up to date
    return cfg


def candidate(cfg, top1, scale=None):
    """A pipeline run whose compressed model scores `top1` (and is perturbed by `scale`), registered."""
    path = output_dir(cfg, "evaluate") / "stage.json"
    record = json.loads(path.read_text())
    record["summary"]["compressed"]["top1"] = top1
    record["summary"]["top1_drop"] = record["summary"]["baseline"]["top1"] - top1
    path.write_text(json.dumps(record))
    if scale is not None:  # make this run's model distinguishable from the others'
        model = load_model(output_dir(cfg, "recover") / "model.pt")
        with torch.no_grad():
            model.head.weight.mul_(scale)
        save_model(model, output_dir(cfg, "recover") / "model.pt")
    with pipeline_run(cfg) as run_id:
        log_model(cfg, "recover", LOGGED_MODELS["recover"])
    return run_id, register(cfg, run_id)


def aliases(cfg):
    return {k: str(v) for k, v in client_for(cfg).get_registered_model(cfg.registered_model_name).aliases.items()}


def test_champion_challenger_promotion_and_rollback(pipeline):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    assert name == "convheads-vit_tiny_patch16_224"
    x = torch.randn(2, 3, 16, 16)

    run1, first = candidate(cfg, 0.60, scale=1.0)
    v1_outputs = load_model(output_dir(cfg, "recover") / "model.pt")(x)
    assert first["promotion"] == CHAMPION and first["reasons"][-1] == "no current champion"
    assert aliases(cfg) == {CHAMPION: "1", CHALLENGER: "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["base_model"] == "vit_tiny_patch16_224" and tags["heads_replaced"] == "4"
    assert tags["top1"] == "0.600000" and tags["promotion"] == CHAMPION and len(tags["data_version"]) == 64
    assert {"top1_drop", "speedup", "git_commit"} <= set(tags)
    run = client.get_run(run1)
    assert run.data.tags["promotion"] == CHAMPION and run.data.tags["registry_version"] == f"{name}/1"
    torch.testing.assert_close(load_champion(cfg)(x), v1_outputs, atol=1e-5, rtol=1e-5)

    _, worse = candidate(cfg, 0.55, scale=2.0)
    assert worse["promotion"] == "rejected" and worse["previous_champion"] == 1
    assert worse["reasons"][-1] == "top-1 0.5500 <= champion's 0.6000 on the same test data"
    assert aliases(cfg) == {CHAMPION: "1", CHALLENGER: "2"}
    assert client.get_model_version(name, "2").tags["promotion"] == "rejected"

    _, better = candidate(cfg, 0.70, scale=3.0)
    v3_outputs = load_model(output_dir(cfg, "recover") / "model.pt")(x)
    assert better["promotion"] == CHAMPION and aliases(cfg) == {CHAMPION: "3", CHALLENGER: "3"}
    torch.testing.assert_close(load_champion(cfg)(x), v3_outputs, atol=1e-5, rtol=1e-5)

    rolled = set_champion(client, name, "1", reason="rollback")
    assert rolled == {"model_name": name, "version": 1, "previous_champion": 3}
    assert aliases(cfg)[CHAMPION] == "1"
    assert client.get_model_version(name, "1").tags["promotion"] == "champion (rollback)"
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    torch.testing.assert_close(load_champion(cfg)(x), v1_outputs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v1_outputs, v3_outputs)


def test_a_failed_gate_registers_but_never_crowns(pipeline):
    cfg = validate({**pipeline.model_dump(mode="json"), "registry": {"max_top1_drop": 0.0, "min_speedup": 0.01}})
    _, result = candidate(cfg, 0.0)
    assert result["promotion"] == "rejected" and "max 0.00 pts" in result["reasons"][0]
    assert aliases(cfg) == {CHALLENGER: "1"}
    with pytest.raises(ConvHeadsError, match="has no champion yet"):
        load_champion(cfg)


def test_bad_manual_promotions_leave_the_registry_unchanged(pipeline):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    with pytest.raises(ConvHeadsError, match="the registry is empty"):
        set_champion(client, name, "1")
    with pytest.raises(ConvHeadsError, match="no registered model"):
        load_champion(cfg)
    candidate(cfg, 0.6)
    client.create_registered_model("other-model")
    before = (aliases(cfg), [v.version for v in client.search_model_versions(f"name = '{name}'")])
    for version, match in [
        ("7", r"has no version '7'; versions: 1"),
        ("models:/other-model/1", "is a version of model 'other-model', not of"),
    ]:
        with pytest.raises(ConvHeadsError, match=match):
            set_champion(client, name, version)
    with pytest.raises(ConvHeadsError, match="no registered model 'nope'; known: "):
        set_champion(client, "nope", "1")
    with pytest.raises(ConvHeadsError, match="'other-model' has no versions yet"):
        set_champion(client, "other-model", "1")
    assert (aliases(cfg), [v.version for v in client.search_model_versions(f"name = '{name}'")]) == before
    assert not client.get_registered_model("other-model").aliases


def test_registering_the_same_run_twice_reuses_its_version(pipeline):
    run_id, first = candidate(pipeline, 0.6)
    again = register(pipeline, run_id)
    assert again["version"] == first["version"] == 1
    assert len(client_for(pipeline).search_model_versions(f"name = '{pipeline.registered_model_name}'")) == 1
