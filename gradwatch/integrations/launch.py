"""`gradwatch run`'s side inside the training process: attach without changes to the script.

`gradwatch run` puts `_site/` first on the child's `PYTHONPATH`; its `sitecustomize` calls
`install()` at interpreter start in every Python process of the job (torchrun's workers,
`mp.spawn`'s children). Nothing heavy is imported then: the hooks go in when the script
itself imports the library they belong to.

- **Lightning**: `lightning_callbacks()` is registered under Lightning's
  `lightning.pytorch.callbacks_factory` entry point and adds a `GradwatchCallback` to every
  `Trainer` of a launched process (and nothing elsewhere).
- **Hugging Face**: when `transformers.trainer` is imported, a `GradwatchCallback` joins its
  `DEFAULT_CALLBACKS`, which every `Trainer` starts with.
- **Anything else**: when `torch` is imported, torch's global module forward hooks note
  every module called at the top level (not from inside another module's forward) with
  grad enabled, and torch's global optimizer step pre-hook waits for the first optimizer
  step. There the model is the noted module that holds most of that optimizer's
  parameters (as called: a `DistributedDataParallel` or `torch.compile` wrapper, which the
  agent looks through), and `gradwatch.watch(model, optimizer)` attaches before the step
  runs. The forward hooks are then removed, and the step hook turns inert (torch is iterating
  over the step hooks at that moment, so it cannot be removed).

Each attach prints one line on stderr saying where it attached. A job that attaches
gradwatch itself is left alone.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

ENV_ACTIVE = "GRADWATCH_LAUNCH"  # "1" in a process started by `gradwatch run`
ENV_RUN = "GRADWATCH_LAUNCH_RUN"  # --run NAME
ENV_CONFIG = "GRADWATCH_LAUNCH_CONFIG"  # --config FILE, as an absolute path
SITE_DIR = Path(__file__).resolve().parent / "_site"
_GIVE_UP_AFTER = 3  # optimizer steps without a model that holds the optimizer's parameters

log = logging.getLogger("gradwatch.integrations")
_announced = False


def launch_env(environ: Mapping[str, str], run: str | None, config: Path | None) -> dict[str, str]:
    """The environment `gradwatch run` gives the command: `environ` with `_site/` first on PYTHONPATH."""
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), environ.get("PYTHONPATH", "")) if p)
    env[ENV_ACTIVE] = "1"
    env.pop(ENV_RUN, None)
    env.pop(ENV_CONFIG, None)
    if run:
        env[ENV_RUN] = run
    if config is not None:
        env[ENV_CONFIG] = str(config.resolve())
    return env


def launched() -> bool:
    """True in a process started by `gradwatch run`."""
    return os.environ.get(ENV_ACTIVE) == "1"


def launch_settings() -> tuple[str | None, str | None]:
    """(run name, config file) given to `gradwatch run`."""
    return os.environ.get(ENV_RUN) or None, os.environ.get(ENV_CONFIG) or None


def announce(watcher: Any, model: Any, optimizer: Any, where: str) -> None:
    """Say where gradwatch attached: one line on stderr under `gradwatch run`, else an INFO log."""
    global _announced
    from gradwatch.agent.watcher import unwrap_model, unwrap_optimizer

    _announced = True
    inner_model, model_wrappers = unwrap_model(model)
    inner, wrappers = unwrap_optimizer(optimizer)
    rank = _rank()
    text = (f"gradwatch: attached {where} to {type(inner_model).__name__}{_inside(model_wrappers)} "
            f"({len(watcher.params)} params in {len(watcher.layers)} layers) and {type(inner).__name__}"
            f"{_inside(wrappers)}: run {watcher.name!r} "
            f"id {watcher.run_id}{f' rank {rank}' if rank is not None else ''}, log {watcher.path}")
    if launched():
        print(text, file=sys.stderr, flush=True)
    else:
        log.info(text)


def _inside(wrappers: list[str]) -> str:
    return f" inside {' > '.join(wrappers)}" if wrappers else ""


def install() -> None:
    """Called by `_site/sitecustomize.py`: hook the libraries as the script imports them."""
    if not launched():
        return
    actions: dict[str, Callable[[ModuleType], None]] = {"torch": _hook_torch,
                                                         "transformers.trainer": _hook_transformers}
    pending = {}
    for name, action in actions.items():
        if name in sys.modules:
            _safely(action, sys.modules[name])
        else:
            pending[name] = action
    if pending:
        sys.meta_path.insert(0, _AfterImport(pending))


def lightning_callbacks() -> list[Any]:
    """Lightning's `callbacks_factory` entry point: the launched callback, or nothing outside `gradwatch run`."""
    if not launched():
        return []
    from gradwatch.integrations.lightning import _Launched

    run, config = launch_settings()
    return [_Launched(run=run, config=config)]


# ---------------------------------------------------------------------- import hooks


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs an action on a module right after it is first imported (then forgets it)."""

    def __init__(self, actions: dict[str, Callable[[ModuleType], None]]) -> None:
        self.actions = actions

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        action = self.actions.pop(fullname, None)
        if action is None:
            return None
        if not self.actions and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRun(spec.loader, action)
                return spec
        return None


class _ThenRun(importlib.abc.Loader):
    """A loader that executes the module with the real loader, then runs the action on it."""

    def __init__(self, loader: Any, action: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.action = action

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader  # the module keeps the real loader, as if nothing had come between
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _safely(self.action, module)


def _safely(action: Callable[[ModuleType], None], module: ModuleType) -> None:
    """The launcher never breaks the job: a failure is one line on stderr."""
    try:
        action(module)
    except Exception as exc:
        print(f"gradwatch: not attached: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _hook_transformers(module: ModuleType) -> None:
    from gradwatch.integrations.hf import _Launched

    run, config = launch_settings()
    module.DEFAULT_CALLBACKS.append(_Launched(run=run, config=config))


def _hook_torch(module: ModuleType) -> None:
    _FirstStep(*launch_settings())


# ---------------------------------------------------------------------- the generic attach


class _FirstStep:
    """Torch's global hooks: top-level modules noted until the first optimizer step attaches."""

    def __init__(self, run: str | None, config: str | None) -> None:
        import torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.run, self.config = run, config
        self._grad_enabled = torch.is_grad_enabled
        self._compiling = _is_compiling()
        self._depth = 0
        self._tops: dict[int, weakref.ref[Any]] = {}
        self._misses = 0
        self._done = False
        self._compiled = False  # a torch.compile'd module was called
        self._forward_handles = [register_module_forward_pre_hook(self._enter),
                                 register_module_forward_hook(self._leave, always_call=True)]
        # torch warns that global hooks also fire for a compiled model's wrapper: these expect it.
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        # Never removed: torch iterates over the global step hooks while this one runs, so it
        # turns itself inert instead (one attribute check per step).
        register_optimizer_step_pre_hook(self._on_step)
        atexit.register(self._at_exit)

    def _enter(self, module: Any, args: Any) -> None:
        if self._compiling() or self._done:
            return  # inside a compiled model: its wrapper, called eagerly, was noted
        if self._depth == 0 and module.training and self._grad_enabled():
            if id(module) not in self._tops and len(self._tops) < 64:
                self._tops[id(module)] = weakref.ref(module)
                self._compiled = self._compiled or hasattr(module, "_orig_mod")
        self._depth += 1

    def _leave(self, module: Any, args: Any, output: Any) -> None:
        if not self._compiling():
            self._depth = max(0, self._depth - 1)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._done:
            return
        self._depth = 0
        model, held, total = self._model_for(optimizer)
        if model is None:
            self._misses += 1
            if self._misses >= _GIVE_UP_AFTER:
                self._stop(f"gradwatch: not attached: no module called at the top level holds the parameters of "
                           f"{type(optimizer).__name__} after {self._misses} steps")
            return
        import gradwatch

        try:
            watcher = gradwatch.watch(model, optimizer, run=self.run, config=self.config)
        except Exception as exc:  # the launcher never breaks the job
            if "already watching" in str(exc):
                self._stop(None if _announced else "gradwatch: the job attaches gradwatch itself; the launcher "
                                                   "stays out")
            else:
                self._stop(f"gradwatch: not attached: {exc}")
            return
        where = "at the first optimizer step"
        if held < total:
            where += f" ({total - held} of the optimizer's {total} params are not in this model)"
        announce(watcher, model, optimizer, where)
        self._stop(None)

    def _model_for(self, optimizer: Any) -> tuple[Any, int, int]:
        """(the noted top-level module holding most of the optimizer's params, how many, of how many)."""
        wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
        best, best_held = None, 0
        for ref in self._tops.values():
            module = ref()
            if module is None:
                continue
            held = sum(1 for p in module.parameters() if id(p) in wanted)
            if held > best_held:
                best, best_held = module, held
        return best, best_held, len(wanted)

    def _stop(self, message: str | None) -> None:
        """Attached, or given up: say why if there is something to say, and remove the forward hooks.

        Under torch.compile they stay, inert: dynamo traced the model with them, and removing
        them would make it compile the model once more.
        """
        if message:
            print(message, file=sys.stderr, flush=True)
        self._done = True
        self._tops.clear()
        if not self._compiled:
            for handle in self._forward_handles:
                handle.remove()
            self._forward_handles = []

    def _at_exit(self) -> None:
        """A job that ran modules but never stepped (an evaluation script) hears why nothing was recorded;
        multiprocessing's children (data loader workers) say nothing."""
        import multiprocessing

        if not self._done and self._tops and multiprocessing.parent_process() is None:
            print("gradwatch: not attached: the job called modules but never stepped an optimizer",
                  file=sys.stderr, flush=True)


def _is_compiling() -> Callable[[], bool]:
    """torch's "is torch.compile tracing?" (the hooks then stay out of its graph)."""
    import torch

    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling
    return is_compiling


def _rank() -> int | None:
    """This process's rank in a distributed job, None outside one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None
