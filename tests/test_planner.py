"""The packing planner: op counts per layout, the choice it makes, and the column layout it can pick."""

import numpy as np
import pytest

from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear
from hetrain.mpc_ops.layers.packing import PackingPlan
from hetrain.mpc_ops.layers.planner import DEFAULT_COSTS, PackingShape, forward_counts, gradient_counts, plan_layer, price
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedBatch, OwnerPart


def test_rows_forward_needs_one_product_and_log2_seg_rotations_per_chunk_and_output():
    # Prepare: 30 features -> seg 32 -> 128 samples per ciphertext; 200 samples -> 2 chunks
    shape = PackingShape(owners=(30,), out_features=8, batch=200, slots=4096)
    # Execute
    counts = forward_counts("rows", shape, 200)
    # Assert
    assert counts["mul_plain"] == 8 * 2
    assert counts["rotate"] == 8 * 2 * 5
    assert counts["decrypt"] == 8 * 2


def test_column_forward_needs_d_scalar_products_and_no_rotation():
    # Prepare
    shape = PackingShape(owners=(32, 32), out_features=8, batch=1000, slots=4096)
    # Execute
    counts = forward_counts("column", shape, 1000)
    # Assert
    assert counts["mul_scalar"] == 64 * 8
    assert counts["rotate"] == 0
    assert counts["decrypt"] == 8


def test_cols_gradient_packs_every_chunk_before_one_rotate_and_sum_per_owner_and_output():
    # Prepare: two owners of 32 features -> T = 128; 512 samples -> 4 chunks per owner
    shape = PackingShape(owners=(32, 32), out_features=4, batch=512, slots=4096)
    # Execute
    counts = gradient_counts("cols", shape, 512)
    # Assert
    assert counts["mul_plain"] == 4 * 4 * 2
    assert counts["rotate"] == 4 * 2 * 7
    assert counts["decrypt"] == 4 * 2


@pytest.mark.parametrize("batch, expected", [(64, "rows"), (2048, "column")])
def test_planner_picks_rows_for_small_batches_and_column_for_large_ones(batch, expected):
    # Prepare
    shape = PackingShape(owners=(30,), out_features=4, batch=batch, slots=4096)
    # Execute
    plan = plan_layer(shape)
    # Assert: the choice is the cheapest executable candidate, and it is priced from its counts
    assert plan.chosen.forward == expected and plan.chosen.gradient == "cols"
    executable = [c for c in plan.candidates if c.executable]
    assert plan.chosen.seconds == min(c.seconds for c in executable)
    assert plan.chosen.seconds == pytest.approx(price(plan.chosen.counts, DEFAULT_COSTS))
    assert {c.gradient for c in plan.candidates} == {"cols", "column_sum", "replicated"}


def test_planner_honours_a_forced_layout_and_rejects_an_unknown_one():
    # Prepare
    shape = PackingShape(owners=(30,), out_features=4, batch=64, slots=4096)
    # Execute / Assert
    assert plan_layer(shape, forward="column").chosen.forward == "column"
    with pytest.raises(ValueError, match="packing.forward must be 'auto', 'rows' or 'column'"):
        plan_layer(shape, forward="diagonal")


def test_column_forward_matches_x_times_w_within_the_flooding_tolerance(ckks_keys):
    # Prepare: two vertical owners, 300 samples, column layout (one ciphertext per feature)
    holder, public = ckks_keys
    plan = PackingPlan.for_features([32, 32], holder.params.slots, forward="column")
    rng = np.random.default_rng(5)
    x = np.clip(rng.normal(size=(300, 64)), -4, 4)
    w = rng.normal(scale=0.2, size=(64, 8))
    parts = []
    for name, idx in (("a", np.arange(32)), ("b", np.arange(32, 64))):
        column = [ckks.encrypt(public, v) for sl in plan.column_chunks(300) for v in plan.column_vectors(x[sl][:, idx])]
        parts.append(OwnerPart(name, idx, [], [], column))
    layer = CipherLinear("enc1", w, public, plan, holder.params.headroom, 64.0)
    # Execute
    enc = layer.forward(EncryptedBatch("b", 300, parts, [f"{i:024x}" for i in range(300)]))
    request, masks = blind(enc, public, key_id=holder.key_id, round_no=0, mask_bound=64.0)
    response = holder.reveal(request)
    z = unblind(enc, response, masks)
    # Assert: 8σ of the flooding noise after the smallest gain (P(|z|>8σ) ≈ 1e-15), plus CKKS error
    assert len(enc.blobs) == 8 and enc.stride == [1] * 8
    np.testing.assert_allclose(z, x @ w, rtol=0, atol=8 * response.sigma / min(enc.gains) + 1e-6)


def test_jobs_split_across_two_worker_processes_give_byte_identical_ciphertexts(ckks_keys):
    # Prepare: a rows-layout forward's jobs (8 outputs × 1 chunk) on a real encrypted batch
    from hetrain.mpc_ops.crypto.jobs import JobRunner

    holder, public = ckks_keys
    plan = PackingPlan.for_features([30], holder.params.slots)
    rng = np.random.default_rng(2)
    blob = ckks.encrypt(public, plan.rows_vector(np.clip(rng.normal(size=(100, 30)), -4, 4)))
    jobs = [([(0, plan.weight_vector(rng.normal(size=30)))], plan.seg) for _ in range(8)]
    # Execute
    serial = JobRunner(public, plan.slots, workers=1).run([blob], jobs)
    parallel = JobRunner(public, plan.slots, workers=2).run([blob], jobs)
    # Assert: same CKKS operations, same bytes, same order; the input blob is untouched
    assert parallel == serial
    assert len(serial) == 8


def test_parameter_chooser_picks_the_smallest_ring_whose_flooding_noise_trains():
    # Prepare
    from hetrain.mpc_ops.layers.planner import choose_ckks_params

    # Execute
    rows = choose_ckks_params(security_bits=30, budget=65536, max_sigma=0.5)
    # Assert: N=4096 cannot reach the precision (scale 2^29 under its 109-bit bound); N=8192 can,
    # with the shipped default [60, 50, 60] at scale 2^50; every candidate respects the bound
    first_ok = next(r for r in rows if r["ok"])
    assert (first_ok["poly_modulus_degree"], first_ok["coeff_mod_bit_sizes"], first_ok["scale_bits"]) == \
        (8192, [60, 50, 60], 50)
    assert rows[0]["poly_modulus_degree"] == 4096 and not rows[0]["ok"]
    assert all(r["total_bits"] <= r["limit_bits"] for r in rows)
