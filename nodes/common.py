"""Shared bits of the node classes: socket type names, the category, and error wrapping."""

from __future__ import annotations

import functools
import logging

from twig_core.errors import TwigError

from . import host

CATEGORY = "Twig"

MODEL = "TWIG_MODEL"
TEXT_ENCODER = "TWIG_TEXT_ENCODER"
VAE = "TWIG_VAE"
CONDITIONING = "TWIG_CONDITIONING"

log = logging.getLogger("twig")


class NodeError(TwigError):
    """A node failed; the message starts with the node's name and says what it was doing."""


NodeError.__module__ = "twig"  # ComfyUI shows the qualified name; the import path under custom_nodes is noise


def node_errors(title: str):
    """Decorate a node FUNCTION so every failure reaches the user as one readable line with context.

    The host's interrupt and out-of-memory exceptions pass through untouched (ComfyUI reacts to their
    types), after the failed call's temporary tensors are freed.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except NodeError:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised below, with context
                if host.is_interrupt(e) or host.is_oom(e) or not isinstance(e, Exception):
                    host.free_after_failure(e)
                    raise
                host.free_after_failure(e)
                if isinstance(e, TwigError):
                    raise NodeError(f"{title}: {e}") from e
                raise NodeError(f"{title}: unexpected {type(e).__name__}: {e}") from e

        return run

    return wrap
