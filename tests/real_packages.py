"""The published lightly and stable-pretraining SIGReg classes, loaded from their installed files.

Neither package is a dependency: their package ``__init__`` files pull torchvision,
lightning, timm, transformers. The files that define the loss classes need only
torch, so they are executed alone: ``pip install --no-deps lightly==1.6.0
stable-pretraining==0.1.8`` is enough. Each loader returns ``None`` when the
package is not installed; the caller skips, saying so.
"""

import importlib.metadata
import importlib.util
import os
import sys
import types

import torch

LIGHTLY_VERSION = "1.6.0"
STABLE_PRETRAINING_VERSION = "0.1.8"


def _installed_version(distribution: str):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _exec_file(name: str, path: str, stubs: dict):
    """Executes ``path`` as module ``name`` with ``stubs`` in ``sys.modules`` meanwhile (restored after)."""
    saved = {key: sys.modules.get(key) for key in [*stubs, name]}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def load_lightly():
    """``types.SimpleNamespace(lejepa_loss=..., lewm_loss=...)`` of the installed lightly, or None."""
    if _installed_version("lightly") != LIGHTLY_VERSION:
        return None
    import lightly.utils.dist  # noqa: F401  (torch only)

    loss_dir = os.path.join(os.path.dirname(importlib.util.find_spec("lightly").origin), "loss")
    # A bare ``lightly.loss`` package: its __init__ imports every loss, torchvision among them.
    package = types.ModuleType("lightly.loss")
    package.__path__ = [loss_dir]
    stubs = {"lightly.loss": package}
    modules = {}
    for name in ("latent_distance", "lejepa_loss", "lewm_loss"):
        module = _exec_file(f"lightly.loss.{name}", os.path.join(loss_dir, f"{name}.py"), stubs)
        stubs[f"lightly.loss.{name}"] = module
        setattr(package, name, module)
        modules[name] = module
    return types.SimpleNamespace(**modules)


def load_stable_pretraining():
    """The installed ``stable_pretraining.methods.lejepa`` module (its EppsPulley, SlicedEppsPulley), or None."""
    if _installed_version("stable-pretraining") != STABLE_PRETRAINING_VERSION:
        return None
    root = os.path.dirname(importlib.util.find_spec("stable_pretraining").origin)

    def stub(name, **attributes):
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        return module

    # What the file imports for its LeJEPA model class, which is not compared here.
    stubs = {
        "transformers": stub("transformers"),
        "transformers.utils": stub("transformers.utils", ModelOutput=type("ModelOutput", (), {})),
        "timm": stub("timm"),
        "stable_pretraining": stub("stable_pretraining", Module=torch.nn.Module),
        "stable_pretraining.backbone": stub("stable_pretraining.backbone", MLP=torch.nn.Module),
    }
    return _exec_file("published_stable_pretraining_lejepa", os.path.join(root, "methods", "lejepa.py"), stubs)
