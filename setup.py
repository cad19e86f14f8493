"""Only what setup.cfg cannot say: install ``ssod_zoo-autoload.pth`` next to the package in site-packages."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = 'ssod_zoo-autoload.pth'


class BuildPyWithPth(build_py):
    """Puts the .pth at the wheel's root, so it lands in site-packages and runs at interpreter start-up."""

    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        with open(os.path.join(self.build_lib, PTH), 'w') as f:
            f.write('import _ssod_zoo_autoload\n')

    def get_outputs(self, *args, **kwargs):
        return super().get_outputs(*args, **kwargs) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={'build_py': BuildPyWithPth})
