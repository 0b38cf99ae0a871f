"""Task YAMLs of the holoprune lmms-eval plugin (none: the plugin adds models only).

lmms-eval adds ``<plugin>.tasks``' folder to its task search path for every
package named in ``LMMS_EVAL_PLUGINS``, so the package must exist.
"""
