"""Registers the ssod_* models with timm the moment timm is imported, with no ``import ssod_zoo``.

Run at interpreter start-up by ``ssod_zoo-autoload.pth`` in site-packages. It only puts a finder on
``sys.meta_path`` (no import of timm, torch or ssod_zoo), so start-up costs next to nothing when timm is never
imported. When timm is imported, the finder lets the normal machinery load it, then imports ssod_zoo; any
failure there becomes a warning, never a broken ``import timm``. ``SSOD_ZOO_AUTOLOAD=0`` switches it off.
"""
import os
import sys


class _TimmImportHook:
    """Meta-path finder that wraps timm's loader so ssod_zoo is imported right after timm."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        for finder in sys.meta_path:  # let the finders after us locate timm as usual
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _ThenImportSSOD(spec.loader, self)
                return spec
        return None


class _ThenImportSSOD:
    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)  # timm is loaded: the hook's work is done
        try:
            import ssod_zoo  # noqa: F401  (registers the models)
        except Exception as e:  # never let a broken ssod_zoo break `import timm`
            import warnings
            warnings.warn(f'ssod_zoo could not register its models with timm ({type(e).__name__}: {e}); '
                          'set SSOD_ZOO_AUTOLOAD=0 to silence this', RuntimeWarning)


def install():
    if os.environ.get('SSOD_ZOO_AUTOLOAD', '1').lower() in ('0', 'false', 'no', 'off'):
        return
    if 'timm' not in sys.modules and not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


install()
