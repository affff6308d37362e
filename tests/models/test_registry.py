"""build_model / make_config: names, overrides, error messages, config validation."""

import pytest
from flax import nnx

from recjax.models import HSTU, SASRec, build_model, config_fields, make_config, model_names


def test_names_and_defaults():
    assert model_names() == ("hstu", "lime", "mfli", "sasrec")
    sas = make_config("sasrec", 3706)
    assert (sas.max_len, sas.embed_dim, sas.num_blocks, sas.num_heads, sas.dropout) == (200, 50, 2, 1, 0.2)
    assert (sas.ffn, sas.ffn_hidden_dim, sas.ffn_activation, sas.l2_normalize) == ("dense", 50, "relu", True)
    hstu = make_config("hstu", 3706)
    assert (hstu.attention_dim, hstu.linear_dim, hstu.num_blocks, hstu.num_heads) == (50, 50, 2, 1)
    assert "num_items" not in config_fields("hstu") and "attention_dim" in config_fields("hstu")


def test_build_model_with_overrides():
    m = build_model("sasrec", 10, rngs=nnx.Rngs(0), max_len=6, embed_dim=4, num_blocks=1, dropout=0.0)
    assert isinstance(m, SASRec) and len(m.blocks) == 1 and m.config.max_len == 6
    m = build_model("hstu", 10, rngs=nnx.Rngs(0), max_len=6, embed_dim=4, num_blocks=3, ffn_options=[])
    assert isinstance(m, HSTU) and len(m.blocks) == 3 and m.config.ffn_options == ()
    cfg = make_config("sasrec", 10, ffn="moe", ffn_options={"top_k": 1, "num_experts": 2})
    assert cfg.ffn_options == (("num_experts", 2), ("top_k", 1))  # hashable, order-independent


def test_errors_list_valid_choices():
    names = r"\('hstu', 'lime', 'mfli', 'sasrec'\)"
    with pytest.raises(ValueError, match=rf"model name: expected one of {names}, got 'bert4rec'"):
        build_model("bert4rec", 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown \['hidden'\]; valid keys are \[.*'embed_dim'"):
        build_model("sasrec", 10, rngs=nnx.Rngs(0), hidden=3)
    with pytest.raises(ValueError, match="sasrec.num_heads: expected a divisor of embed_dim=50"):
        make_config("sasrec", 10, num_heads=3)
    with pytest.raises(ValueError, match="sasrec.num_items: expected > 0"):
        make_config("sasrec", 0)
    with pytest.raises(ValueError, match=r"hstu.dropout: expected a rate in \[0, 1\)"):
        make_config("hstu", 10, dropout=1.0)
    with pytest.raises(ValueError, match="sasrec.ffn: expected one of"):
        make_config("sasrec", 10, ffn="none")
    with pytest.raises(ValueError, match="hstu.ffn: expected 'none' or one of"):
        make_config("hstu", 10, ffn="sparse")
    with pytest.raises(ValueError, match="sasrec.ffn_activation: expected one of"):
        make_config("sasrec", 10, ffn_activation="tanh")
