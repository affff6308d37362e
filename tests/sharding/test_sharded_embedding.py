"""Row-wise / table-wise embedding lookups (shard_map + all-to-all) == a plain gather, values and gradients,
on 8 simulated CPU devices; N-d meshes and rules refused naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recjax.sharding import embedding as E
from recjax.sharding import mesh as mesh_lib

MESHES = ((8, 1), (4, 2), (2, 4))


@pytest.mark.parametrize("data,model", MESHES)
@pytest.mark.parametrize("placement", ["row", "table"])
def test_lookup_and_gradient_match_a_gather(data, model, placement):
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=data, model=model))
    table = jax.random.normal(jax.random.key(0), (64, 6))
    ids = jax.random.randint(jax.random.key(1), (8, 3), 0, 64)
    w = jax.random.normal(jax.random.key(2), (8, 3, 6))
    spec = P("model", None) if placement == "row" else P()
    table_s = jax.device_put(table, NamedSharding(mesh, spec))
    ids_s = jax.device_put(ids, NamedSharding(mesh, P("data")))
    plan = E.EmbeddingPlan.from_config({"items": placement})

    def f(t, i):
        with E.use_plan(mesh, plan):
            return E.lookup(t, i, "items")

    np.testing.assert_array_equal(jax.jit(f)(table_s, ids_s), table[ids])
    grad = jax.jit(jax.grad(lambda t: jnp.sum(f(t, ids_s) * w)))(table_s)
    ref = jax.grad(lambda t: jnp.sum(t[ids] * w))(table)
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-6)
    odd = ids[:5]  # 15 ids, padded inside to a multiple of the device count
    np.testing.assert_array_equal(jax.jit(f)(table_s, odd), table[odd])
    if placement == "row" and model > 1:
        assert grad.sharding.spec[0] == "model"  # gradients stay row-sharded


def test_lookup_uses_the_all_to_all_path_only_inside_a_plan():
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=2, model=4))
    table = jnp.arange(32.0).reshape(16, 2)
    ids = jnp.array([[3, 15], [0, 7]])
    text = jax.jit(lambda t, i: E.lookup(t, i)).lower(table, ids).as_text()
    assert "all_to_all" not in text and "all-to-all" not in text
    plan = E.EmbeddingPlan.from_config({"items": "row"})
    with E.use_plan(mesh, plan):
        text = jax.jit(lambda t, i: E.lookup(t, i)).lower(table, ids).as_text()
    assert "all_to_all" in text or "all-to-all" in text


def test_mesh_config_and_rules_refused_naming_the_field():
    assert dict(mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(model=2)).shape) == {
        "data": 4,
        "model": 2,
        "expert": 1,
    }
    with pytest.raises(ValueError, match="mesh.model: 3 does not divide"):
        mesh_lib.MeshConfig(model=3).shape(8)
    with pytest.raises(ValueError, match="mesh.data"):
        mesh_lib.MeshConfig(data=4, model=4).shape(8)
    with pytest.raises(ValueError, match="mesh.expert: expected >= 1"):
        mesh_lib.MeshConfig(expert=0)
    with pytest.raises(ValueError, match=r"rules\['vocab'\]: unknown mesh axis 'modle'"):
        mesh_lib.check_rules({**mesh_lib.DEFAULT_RULES, "vocab": "modle"})
    with pytest.raises(ValueError, match=r"tables\['items'\].placement"):
        E.EmbeddingPlan.from_config({"items": "rows"})
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(model=2))
    with pytest.raises(ValueError, match="embedding_plan.axis"):
        E.EmbeddingPlan.from_config({"items": "row"}, axis="rows").check(mesh)
    with pytest.raises(ValueError, match=r"tables\['items'\].owner"):
        E.EmbeddingPlan((E.TablePlacement("items", "table", owner=2),)).check(mesh)
