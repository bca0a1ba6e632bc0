"""train.cogpo_variants: extra preference runs (e.g. plain DPO) from the same SFT model and pairs."""

import pytest

from crv_ray.config import ConfigError, load_config_dict
from crv_ray.stages import model_dir
from crv_ray.train.config import TrainConfig, variant_config

MIN = {
    "run_dir": "runs/x",
    "student": {"name": "tiny", "size": "1M", "model": "builtin:tiny"},
    "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
}
ONE_BETA = {"gap_betas": {"small": 0.5, "medium": 0.5, "large": 0.5}}


def test_variant_replaces_only_its_fields():
    t = TrainConfig.model_validate({"cogpo": {"lr": 3e-6, "epochs": 2}, "cogpo_variants": {"dpo": ONE_BETA}})
    v = variant_config(t, "dpo")
    assert v.cogpo.gap_betas == {"small": 0.5, "medium": 0.5, "large": 0.5}
    assert (v.cogpo.lr, v.cogpo.epochs) == (3e-6, 2)  # inherited from cogpo
    assert t.cogpo.gap_betas == {"small": 1.0, "medium": 0.5, "large": 0.2}  # the main run is untouched
    assert v.sft == t.sft and v.cogpo_variants == {}
    with pytest.raises(ValueError, match="no cogpo variant 'ipo'"):
        variant_config(t, "ipo")


@pytest.mark.parametrize("variants, needle", [
    ({"dpo": {"gap_betaz": {}}}, "cogpo_variants.dpo: gap_betaz: Extra inputs are not permitted"),
    ({"dpo": {"lr": -1}}, "cogpo_variants.dpo: lr"),
    ({"sft": {}}, "'sft' cannot name a variant"),
    ({"a/b": {}}, "'a/b' cannot name a variant"),
])
def test_bad_variants_fail_at_load_naming_the_field(variants, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config_dict({**MIN, "train": {"cogpo_variants": variants}})


def test_eval_models_must_be_models_of_the_run(tmp_path):
    cfg = load_config_dict({**MIN, "run_dir": str(tmp_path), "train": {"cogpo_variants": {"dpo": ONE_BETA}},
                            "eval": {"models": ["base", "sft", "dpo", "cogpo"]}})
    assert model_dir(cfg, "dpo") == tmp_path / "variants" / "dpo" / "model"
    assert model_dir(cfg, "cogpo") == tmp_path / "cogpo" / "model"
    with pytest.raises(ConfigError, match="eval.models: 'dpo' is not a model of this run"):
        load_config_dict({**MIN, "eval": {"models": ["base", "dpo"]}})


def test_variants_do_not_change_the_refine_hash():
    a = load_config_dict(MIN)
    b = load_config_dict({**MIN, "train": {"cogpo_variants": {"dpo": ONE_BETA}}})
    assert a.refine_hash() == b.refine_hash()


def test_loss_variants_validate_at_load_time():
    t = TrainConfig.model_validate({"cogpo_variants": {"dpo": {"loss": "dpo"}, "simpo": {"loss": "simpo",
                                                                                      "simpo_gamma": 1.0}}})
    assert t.cogpo.loss == "cogpo" and t.cogpo.uses_reference
    assert variant_config(t, "dpo").cogpo.loss == "dpo"
    simpo = variant_config(t, "simpo").cogpo
    assert (simpo.loss, simpo.simpo_gamma, simpo.uses_reference) == ("simpo", 1.0, False)
    with pytest.raises(ValueError, match="cogpo_variants.ipo: .*label_smoothing does not apply to loss: ipo"):
        TrainConfig.model_validate({"cogpo": {"label_smoothing": 0.1}, "cogpo_variants": {"ipo": {"loss": "ipo"}}})
    with pytest.raises(ValueError, match=r"cogpo.loss\n  Input should be 'cogpo', 'dpo', 'ipo' or 'simpo'"):
        TrainConfig.model_validate({"cogpo": {"loss": "kto"}})
