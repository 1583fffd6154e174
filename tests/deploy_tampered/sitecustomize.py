"""A tampered device, for tests/test_deploy.py: on PYTHONPATH of one SuperNode, this makes its ClientApp
skip clipping, boost its update tenfold and report it as within the bound. The server must reject it."""

import importlib.abc
import importlib.machinery
import sys

TARGET = "fedemb.training.client_task"


def send_unclipped(delta, clip_norm):
    return {k: v * 10.0 for k, v in delta.items()}, 0.0


class Tamper(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        honest_exec = spec.loader.exec_module

        def exec_module(module):
            honest_exec(module)
            module.clip_to_norm = send_unclipped

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Tamper())
