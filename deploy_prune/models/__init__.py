"""Model registry: ``build_model(spec, num_classes, in_channels)`` is the one door.

``spec`` is a registered name (``deploy-prune models`` lists them), ``timm:NAME`` (any model
timm can create, random init), ``torchvision:NAME`` (any torchvision classification model, random
init), or ``path/to/file.py:factory`` for a user model; the factory is called with
``num_classes`` and ``in_channels`` when it accepts them. Nothing is ever downloaded: trained
weights come from a local checkpoint or state-dict file (``--weights``).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.models.cifar import CifarResNet, CifarVGG, TinyCNN
from deploy_prune.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


@MODELS.register("tiny-cnn", "4-layer CNN (~25k params); the demo and test model")
def tiny_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TinyCNN(num_classes, in_channels)


@MODELS.register("resnet20", "CIFAR ResNet-20 (0.27M params)")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


@MODELS.register("resnet56", "CIFAR ResNet-56 (0.86M params)")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)


@MODELS.register("vgg16_bn", "CIFAR VGG-16 with BatchNorm (14.7M params)")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarVGG(num_classes, in_channels)


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the stem conv for one with ``in_channels`` inputs (same kernel, stride, padding)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return model
            new = nn.Conv2d(
                in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,  # type: ignore[arg-type]
                mod.dilation, mod.groups, mod.bias is not None,  # type: ignore[arg-type]
            )
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return model
    raise UserError("model has no Conv2d to adapt to the input channels")


def _torchvision(arch: str) -> ModelFactory:
    def factory(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision

        # weights=None: nothing is downloaded; users bring their own checkpoints.
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        return _replace_first_conv(model, in_channels)

    factory.__doc__ = f"torchvision {arch} (random init; load weights with --weights)"
    return factory


for _arch in ("resnet18", "resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_large"):
    MODELS.register(_arch)(_torchvision(_arch))


def is_user_model(spec: str) -> bool:
    return ".py:" in spec


def _load_user_factory(spec: str) -> ModelFactory:
    path_s, _, fn_name = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise UserError(f"user model file {path_s!r} not found; use --model path/to/file.py:factory")
    mod_name = f"deploy_prune_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"cannot import {path_s!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: report, do not crash with a traceback
        raise UserError(f"importing {path_s!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{path_s!r} has no callable {fn_name!r}; use --model {path_s}:FACTORY")
    return fn


def _timm(name: str) -> ModelFactory:
    def factory(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        try:
            import timm
        except ImportError:
            raise UserError("timm models need timm: pip install 'deploy-prune[timm]'") from None
        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:8]
            raise UserError(f"timm has no model {name!r}" + (f"; close names: {', '.join(close)}" if close else ""))
        # pretrained=False: no download, ever; trained weights come from --weights
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)  # type: ignore[no-any-return]
    return factory


def _torchvision_any(name: str) -> ModelFactory:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"torchvision has no classification model {name!r}; see torchvision.models.list_models()")
    return _torchvision(name)


def _factory(spec: str) -> ModelFactory:
    lib, colon, name = spec.partition(":")
    if colon and lib == "timm":
        return _timm(name)
    if colon and lib == "torchvision":
        return _torchvision_any(name)
    if colon and lib == "ultralytics":
        from deploy_prune.models import ultralytics

        return lambda num_classes=None, in_channels=3: ultralytics.build(name, num_classes, in_channels)
    return _load_user_factory(spec) if is_user_model(spec) else MODELS.get(spec)


def build_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiate a registered, timm, torchvision or user model adapted to the data's channels and classes."""
    factory = _factory(spec)
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in params}
    try:
        model = factory(**kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"building model {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not a torch nn.Module")
    if "in_channels" not in params:
        model = _replace_first_conv(model, in_channels)
    return model


def check_runs_on(model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None = None) -> None:
    """Dry-run one batch so a model/data mismatch fails early with a clear message. Several outputs
    (a tuple, list or dict of tensors) are accepted where the metric is the user's (``num_classes`` None)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except Exception as e:
        raise UserError(
            f"model cannot run on inputs of shape {list(input_shape)} (C,H,W): {type(e).__name__}: "
            f"{str(e).splitlines()[0]}; pick a model suited to this size or resize with --image-size"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        leaves = torch.utils._pytree.tree_leaves(out)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise UserError(f"the model's forward returns a {type(out).__name__} holding other things than tensors; "
                            "deploy-prune needs a tensor, or a tuple, list or dict of tensors")
        if num_classes is not None:
            raise UserError(f"the model's forward returns a {type(out).__name__}; the built-in accuracy needs one "
                            "(N, classes) tensor: pass evaluate=(model) -> float")
        return
    if num_classes is not None and (out.ndim != 2 or out.shape[1] != num_classes):
        raise UserError(
            f"model outputs shape {list(out.shape)} but the data has {num_classes} classes; "
            "the factory must accept num_classes"
        )
