"""Every public function, class, method and property of the package has a docstring (inherited ones count:
an override of a documented hook needs none of its own)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import structvae


def _public_modules() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(structvae.__path__, "structvae.")]
    return [n for n in names if not any(p.startswith("_") for p in n.split(".")[1:])]


def _doc(cls: type, name: str, value: object) -> str | None:
    if isinstance(value, property):  # a property's docstring is not inherited by inspect.getdoc
        return value.__doc__ or next((inspect.getdoc(vars(base)[name]) for base in cls.__mro__[1:]
                                      if name in vars(base)), None)
    return inspect.getdoc(getattr(cls, name))


def undocumented() -> list[str]:
    missing = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    raw = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                    if member.startswith("_") or not (inspect.isfunction(raw) or isinstance(raw, property)):
                        continue
                    if not _doc(obj, member, value):
                        missing.append(f"{module_name}.{name}.{member}")
    return missing


def test_every_public_function_has_a_docstring() -> None:
    assert undocumented() == []
