"""cim-plugin: class-incremental exemplar compression (CIM, Luo et al., CVPR 2023) for PyCIL.

The method's core (``cim_plugin.core``) has no PyCIL imports; ``cim_plugin.pycil`` is the thin
adapter that PyCIL loads through the hook carried by ``patches/``.
"""

__version__ = "0.1.0"

#: The PyCIL commit that ``patches/`` applies to.
PYCIL_COMMIT = "87cc4110d60765dc3f64af7ef7a693efed8418ff"
