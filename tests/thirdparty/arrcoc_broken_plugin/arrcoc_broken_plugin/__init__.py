"""A plugin whose import fails, as one with a missing dependency would."""

raise ImportError("arrcoc_broken_plugin needs the 'not_installed_gpu_lib' package")
