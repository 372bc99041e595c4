"""Representations of the object and the probe: SIREN, hash-grid MLP, or plain pixels.

`fields` turns a configuration into an `ObjectField` and a `ProbeField`; the engine only
talks to those two interfaces.
"""

from ptyinr.models.fields import ObjectField, ProbeField, build_object_field, build_probe_field

__all__ = ["ObjectField", "ProbeField", "build_object_field", "build_probe_field"]
