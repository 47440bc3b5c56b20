"""Data parallel on 2 CPU devices: with axis_name, pmap and shard_map give the 1-device result on
the combined batch (gradients, oracle results and statistics averaged, per-example rows gathered).

XLA's device count is fixed when JAX starts, so the check runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, PartitionSpec as PS
    from tests import cases
    from tests.jax import _problems as P

    assert jax.device_count() == 2, jax.devices()
    B, STEPS = 16, 3
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, 6)))
    y = jnp.asarray(rng.integers(0, 3, B), jnp.int32)
    params = P.mlp_params((6, 5, 4, 3))

    def step_fn(opt):
        def step(p, s, batch):
            g = jax.grad(P.softmax_ce)(p, batch)
            u, s = opt.update(g, s, p, loss_fn=P.softmax_ce, batch=batch)
            return optax.apply_updates(p, u), s
        return step

    def run(case, kw, modes):
        make = case.jax
        one = make(0.1, **kw)
        step = jax.jit(step_fn(one))
        p, s = params, one.init(params)
        for _ in range(STEPS):
            p, s = step(p, s, (x, y))
        ref, ref_state = p, s
        out = {}
        two = make(0.1, axis_name="data", **kw)
        for mode in modes:
            if mode == "pmap":
                rep = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)
                f = jax.pmap(step_fn(two), axis_name="data")
                p, s = rep(params), rep(two.init(params))
                batch = (x.reshape(2, B // 2, -1), y.reshape(2, B // 2))
                for _ in range(STEPS):
                    p, s = f(p, s, batch)
                # both replicas hold the same parameters and state
                assert max(float(jnp.max(jnp.abs(a[0] - a[1]))) for a in jax.tree.leaves(p)) == 0
                p = jax.tree.map(lambda a: a[0], p)
                s = jax.tree.map(lambda a: a[0], s)
            else:
                mesh = Mesh(np.array(jax.devices()), ("data",))
                f = jax.jit(jax.shard_map(step_fn(two), mesh=mesh,
                                          in_specs=(PS(), PS(), PS("data")),
                                          out_specs=(PS(), PS()), check_vma=False))
                p, s = params, two.init(params)
                for _ in range(STEPS):
                    p, s = f(p, s, (x, y))
            scale = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                        zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
            err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                      zip(jax.tree.leaves(ref), jax.tree.leaves(p)))
            serr = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                       zip(jax.tree.leaves(ref_state.core), jax.tree.leaves(s.core)))
            out[mode] = (err / scale, serr)
        return out

    CH = dict(inverse_method="cholesky")
    # rows of the table (tests/cases.py), with the builders' defaults and this run's keywords
    # the per-layer warm-up (§2.1) counts rows on both devices: 2 x 8 >= 2.5·6 and 2.5·5 (the
    # last two layers skip it, as on the combined 16 rows), 16 < 2.5·7 (the first takes it)
    WARM = dict(refresh_warmup=2, curvature_every=2, inverse_every=2, warmup_rows=2.5, **CH)
    CASES = [
        ("ring/kfac/-", "ring/kfac/-", CH, ["pmap", "shard_map"]),
        ("reng/kfac/fin_diff", "reng/kfac/fin_diff", dict(curvature_every=2, **CH), ["shard_map"]),
        ("rkalman/woodbury/fin_diff", "rkalman/woodbury/fin_diff", dict(), ["pmap"]),
        ("rkalman/kfac/double_bp", "rkalman/kfac/double_bp", CH, ["pmap"]),
        ("ring/kfac/- warm-up", "ring/kfac/-", WARM, ["pmap", "shard_map"]),
    ]
    results = {name: run(cases.get(label, bare=True), kw, modes)
               for name, label, kw, modes in CASES}
    # shard_map's default check_vma=True: jax.grad sums over devices; refused, not silently off
    two = cases.get("ring/kfac/-", bare=True).jax(0.1, axis_name="data", **CH)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    f = jax.jit(jax.shard_map(step_fn(two), mesh=mesh, in_specs=(PS(), PS(), PS("data")),
                              out_specs=(PS(), PS())))
    try:
        f(params, two.init(params), (x, y))
        results["check_vma"] = "ran"
    except ValueError as e:
        results["check_vma"] = "refused" if "check_vma=False" in str(e) else str(e)
    print("RESULTS" + json.dumps(results))
''')


def test_two_devices_equal_one_device_on_the_combined_batch():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    paths = [ROOT, os.path.join(ROOT, "adapters"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")][-1]
    results = json.loads(line[len("RESULTS"):])
    assert results.pop("check_vma") == "refused"
    assert len(results) == 5
    for case, modes in results.items():
        for mode, (rel_err, state_err) in modes.items():
            assert rel_err < 1e-10, f"{case} {mode}: parameters differ by {rel_err:.2e}"
            assert state_err < 1e-10, f"{case} {mode}: state differs by {state_err:.2e}"
