"""README quick start: RING with K-FAC on digits, the core driven by a hand-written NumPy MLP."""

import numpy as np

import grng_core as gc
from grng_core.reference import MLP, load_digits_split

data = load_digits_split(seed=0)
mlp = MLP((64, 32, 10), activation="tanh", loss="softmax_ce")
params = mlp.init(seed=0)                      # list of numpy arrays [W0, b0, W1, b1]
opt = gc.ring(lr=0.2, rho=0.05, damping=1e-2, structure="kfac")
state = opt.init(params, layers=[gc.LayerSpec(0, 1), gc.LayerSpec(2, 3)])

rng = np.random.default_rng(0)
for epoch in range(5):
    for idx in np.array_split(rng.permutation(len(data.x_train)), len(data.x_train) // 64):
        x, y = data.x_train[idx], data.y_train[idx]
        grads = mlp.grad(params, x, y)
        stats = mlp.stats(params, x, y, kind="layers")      # K-FAC inputs and output grads
        updates, state = opt.update(grads, state, params, stats=stats)
        params = gc.apply_updates(params, updates)
    acc = np.mean(np.argmax(mlp.forward(params, data.x_test), 1) == data.labels_test)
    print(f"epoch {epoch + 1}: test accuracy {acc:.3f}")
