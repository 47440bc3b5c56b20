"""grng_torch: RENG, RING and R-Kalman as drop-in `torch.optim.Optimizer` subclasses.

Swap `torch.optim.AdamW` for one of them in an ordinary training loop; the only changes are
that the optimizer is told the model (and the loss module, for the structures that need
per-example gradients or sampled labels) and that `step` takes a closure, as for LBFGS::

    import torch
    from torch import nn
    import grng_torch

    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    criterion = nn.CrossEntropyLoss()
    opt = grng_torch.RING(model.parameters(), model=model, loss_fn=criterion)  # the defaults
    # or: grng_torch.RING(model, lr=0.05, ...)  -- the module's parameters, one group
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

    for epoch in range(100):
        for x, y in loader:
            def closure():
                opt.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
        sched.step()

    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")

Contract
--------
- Construction: `RENG | RING | RKalman(params, lr=None, *, model=None, loss_fn=None,
  sample_targets=None, collective="auto", **hyperparameters)`. `params` is an iterable of
  parameters or param-group dicts (or an `nn.Module`, which is then also `model`). Every
  hyperparameter of the core builder (`grng_core.reng / ring / rkalman`: rho, damping,
  structure, gr, fd_scheme, fd_radius, fisher, momentum, weight_decay, ema_decay,
  curvature_every, inverse_every, kalman_decay, prior_var, ...) is a param-group key, so
  groups may differ (e.g. `weight_decay=0` for biases) and every `torch.optim.lr_scheduler`
  works: the core optimizer of a group is rebuilt (and re-validated) when one of its values
  changes. Invalid values raise the core's ValueError naming the parameter, at construction.
- `model=` is needed by structure="kfac" (hooks on its `nn.Linear` and `nn.Conv2d` layers:
  inputs a, unfolded patches for convolutions, and output gradients s with rows B·dL/dz;
  every other parameter uses the diagonal; the rows of `nn.Linear` layers are kept on every
  step for the factored form, ALGORITHMS.md §2.1), by structure="woodbury" (per-example
  gradients through `torch.func.vmap(grad(...))` over `functional_call`) and by
  fisher="mc". The model may be wrapped in DistributedDataParallel.
- `loss_fn=`: the loss module the closure calls as `loss_fn(output, target)` (reduction
  "mean"). Its targets are read by a forward pre-hook, so per-example gradients use the real
  labels; for fisher="mc" the optimizer re-runs the model on the same inputs, draws targets
  with `sample_targets(output)` (built in for CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss
  and MSELoss) and backpropagates `loss_fn(output, sampled)` once more. A plain function is
  wrapped into `grng_torch.LossModule` (then the closure must call `opt.loss_fn`).
- `step(closure)`: the closure zeroes the gradients, runs the forward pass, calls
  `loss.backward()` and returns the loss. Without a closure (a loop that calls backward()
  itself, e.g. Hugging Face's Trainer) RING with the empirical Fisher steps on the gradients
  and the rows the hooks kept since the previous step; whatever re-evaluates the loss raises
  TypeError then (README "Loops that call backward() themselves"). The optimizer
  calls it again where the algorithm needs another gradient: gr="finite_difference" at
  θ ± εg (same batch, same random numbers, e.g. dropout masks; parameters, `.grad` and
  buffers are restored afterwards). For gr="double_backprop" the closure runs once, inside a
  mode where `loss.backward()` becomes `torch.autograd.grad(loss, params,
  create_graph=True)`: `.grad` gets the detached gradient and the graph is kept only for the
  Hessian-vector product, then freed (no `backward(create_graph=True)` leak). Statistics are
  collected only on the steps that refresh curvature (`core.flags(step)`).
- dtypes: float32, float64 and bfloat16 parameters (the core keeps its state in at least
  float32); `torch.autocast` inside the closure (or around `step`) works: the extra passes
  run under the autocast state of the original forward, the core's math runs outside it.
  A closure-free RING step under an enabled `torch.amp.GradScaler` divides the K-FAC rows by
  its scale (the gradients were unscaled); RENG and R-Kalman need a closure, which GradScaler
  does not pass, and refuse it.
- `state_dict()` / `load_state_dict()`: torch's own machinery. Each group's state is a
  `grng_torch.GroupState(host_step, structure, core)` in
  `opt.state[first_param_of_the_group]["grng"]` (also `opt.group_state(i)`), `core` the typed
  `grng_core.OptState` (step, momentum, factors, inverses, Kalman belief, K-FAC layouts). The
  state dict carries it as plain tensors (`torch.load(weights_only=True)` reads it), restored
  with their own dtypes, so resuming is bit-identical. A state dict of another shape (other
  model, other optimizer or configuration) raises ValueError saying what does not fit.
- Portable checkpoints: `opt.save(path)` / `opt.load(path)` write and read the
  framework-neutral `grng_core` checkpoint (one .npz, no pickle, atomic write, format version,
  optimizer name and hyperparameters checked at load; ValueError and an unchanged optimizer on
  a mismatched, corrupted or pickle-holding file). With one param group the file is exactly
  that group's core state (`grng_core.load_state(path, like=core.init(params), opt=core)`
  continues it in NumPy, JAX, CuPy, ...), and `load` accepts a core state saved by any
  backend (host step counter = step + skipped; K-FAC layer keys "w/b/N" must be
  Linear/Conv2d weights at those positions of the group). Several groups go into one file as
  `{"groups": [...]}`; other frameworks take them one group at a time
  (`opt.save(path, group=k)`, `grng_torch.extract_group(src, k, dest)`). See
  `grng_torch._checkpoint` for the layout.
- Distributed: under torch.distributed (DDP), curvature statistics are averaged with
  all_reduce and per-example rows gathered with all_gather (`torch_collective`), so every
  rank takes the same step (equal local batch sizes).
- Parameters whose `.grad` is None after the closure are not changed (as in torch). Other
  limits: BatchNorm in training mode cannot run under per-example gradients (vmap); the
  K-FAC hooks see only `nn.Linear` / `nn.Conv2d` (groups=1, zero padding) called through
  their own `forward`.
"""

from grng_torch._checkpoint import extract_group
from grng_torch._functional import LossModule, default_sampler
from grng_torch._groups import GroupState
from grng_torch.distributed import torch_collective
from grng_torch.optimizer import RENG, RING, GRNGOptimizer, RKalman, hyperparameter_names

__all__ = [
    "RENG",
    "RING",
    "GRNGOptimizer",
    "GroupState",
    "LossModule",
    "RKalman",
    "default_sampler",
    "extract_group",
    "hyperparameter_names",
    "torch_collective",
]
