"""Builds ether_kernels._C, the compiled operator library.

Install with `pip install --no-build-isolation -e .` (build isolation would download a
second, CUDA, torch just to build against).

What gets built:
  * always (unless ETHER_KERNELS_BUILD_EXTENSION=0): the C++ CPU operators, C++17 -O3 with
    OpenMP. The kernels in csrc/cpu/kernels/ are compiled three times, for the x86-64
    baseline, AVX2 and AVX-512, and the widest one the processor supports is chosen at run
    time (no -march=native: the wheel runs on any x86-64). With ninja (torch's default) the
    three compile at once, each a ninja run of its own beside the extension's other sources
    (MAX_JOBS caps each run, not their sum). ETHER_KERNELS_BASELINE_ONLY=1 compiles the
    baseline alone (a third of their compile time, where CPU speed does not matter: a GPU
    session).
  * the CUDA operators (csrc/cuda/), only where both the CUDA toolkit (CUDA_HOME / nvcc)
    and a CUDA build of torch exist. Decided from the toolkit, never from a visible GPU, so
    a build machine without a GPU produces the same package. ETHER_KERNELS_WITH_CUDA=0/1
    forces it off/on.

If the build fails, or torch is not importable at build time (pip's build isolation), the
install still succeeds (the extension is optional) and the package runs on its pure-PyTorch
reference, warning once; ETHER_KERNELS_REQUIRE_EXTENSION=1 (set by the Makefile) turns a
failed build into a failed install instead. The sdist carries every source (MANIFEST.in).
"""

import concurrent.futures
import glob
import os
import platform
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    """None when unset, else True/False from 1/0, yes/no, true/false, on/off."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() in ("1", "yes", "true", "on")


def relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_build_wanted(torch_module, cpp_extension):
    forced = env_flag("ETHER_KERNELS_WITH_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None
    has_cuda_torch = torch_module.version.cuda is not None
    if forced is False:
        return False
    if forced is True and not (has_toolkit and has_cuda_torch):
        raise RuntimeError(
            "ETHER_KERNELS_WITH_CUDA=1 but "
            + ("no CUDA toolkit was found (set CUDA_HOME)" if not has_toolkit else "")
            + (" and " if not has_toolkit and not has_cuda_torch else "")
            + ("torch is a CPU-only build" if not has_cuda_torch else "")
        )
    return has_toolkit and has_cuda_torch


def extensions_and_cmdclass():
    if env_flag("ETHER_KERNELS_BUILD_EXTENSION") is False:
        return [], {}
    required = bool(env_flag("ETHER_KERNELS_REQUIRE_EXTENSION"))
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        message = (f"torch is not importable here ({error}): the extension is built against "
                   "the installed torch; install torch first and run pip with "
                   "--no-build-isolation")
        if required:
            raise RuntimeError(message) from error
        warnings.warn(message + ". Installing without the compiled extension.")
        return [], {}

    # The AVX2 and AVX-512 copies: on x86-64, unless ETHER_KERNELS_BASELINE_ONLY=1.
    wide_copies = (platform.machine().lower() in ("x86_64", "amd64")
                   and not env_flag("ETHER_KERNELS_BASELINE_ONLY"))
    # Per instruction set: the macros ATen's vector headers key on, and the compiler flags.
    capabilities = {"DEFAULT": []}
    if wide_copies:
        capabilities["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
        capabilities["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                  "-mavx2", "-mfma", "-mf16c"]
    kernel_sources = relative(glob.glob(os.path.join(ROOT, "csrc", "cpu", "kernels", "*.cpp")))

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG"]
    if wide_copies:
        cxx_flags += ["-DETHER_KERNELS_HAVE_AVX2", "-DETHER_KERNELS_HAVE_AVX512"]
    sources = ["csrc/ether_kernels.cpp"] + [
        s for s in relative(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    ]
    depends = relative(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True))
    with_cuda = cuda_build_wanted(torch, cpp_extension)
    common = dict(
        name="ether_kernels._C",
        sources=sources,
        depends=depends,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        optional=not required,
    )
    if with_cuda:
        cuda_sources = relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        cuda_sources += relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        common["sources"] = sources + cuda_sources
        extension = cpp_extension.CUDAExtension(
            extra_compile_args={
                "cxx": cxx_flags + ["-DETHER_KERNELS_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "-DETHER_KERNELS_WITH_CUDA"],
            },
            **common,
        )
    else:
        extension = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx_flags}, **common)

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus one compile of each kernel file per instruction set."""

        def build_extension(self, ext):
            # setuptools' `optional` only forgives distutils' compile errors; torch's ninja
            # build raises RuntimeError. An optional extension's failure of any kind leaves
            # the package on its reference, as documented above.
            try:
                self._build(ext)
            except Exception as error:
                if not ext.optional:
                    raise
                self.warn(f"building {ext.name} failed ({type(error).__name__}: {error}); "
                          "ether_kernels will run on its pure-PyTorch reference")
                # An extension left by an earlier build would load beside Python code it no
                # longer matches: remove it from the build directory and from the source
                # tree (where an in-place or editable install put it; during
                # build_extension setuptools points get_ext_fullpath at the build
                # directory, and it skips copying a failed optional extension).
                for stale in (self.get_ext_fullpath(ext.name), self._in_source_tree(ext)):
                    if os.path.exists(stale):
                        os.remove(stale)
                        self.warn(f"removed the earlier build {stale}")

        def _in_source_tree(self, ext):
            """Where an in-place build puts the extension: its package's source directory."""
            package = ".".join(ext.name.split(".")[:-1])
            package_dir = self.get_finalized_command("build_py").get_package_dir(package)
            filename = os.path.basename(self.get_ext_filename(ext.name))
            return os.path.join(package_dir, filename)

        def _build(self, ext):
            # With ninja, the kernels of each instruction set compile in a ninja run of their
            # own (their own build directory), all at once and beside the extension's other
            # sources: one after another, the three copies of the largest kernel file set the
            # build's length. Their objects join the link, which waits for them. Without
            # ninja, torch's compile swaps the shared compiler command per source file, so
            # the copies compile one after another first.
            cxx = list(ext.extra_compile_args["cxx"])

            def compile_capability(name, flags):
                post_args = dict(ext.extra_compile_args)
                post_args["cxx"] = cxx + flags
                try:
                    return self.compiler.compile(
                        kernel_sources,
                        output_dir=os.path.join(self.build_temp, "capability", name),
                        macros=[("CPU_CAPABILITY", name), ("CPU_CAPABILITY_" + name, None)],
                        include_dirs=ext.include_dirs,
                        extra_postargs=post_args if self.use_ninja else post_args["cxx"],
                        depends=ext.depends,
                    )
                except Exception as error:
                    raise RuntimeError(f"compiling the {name} CPU kernels failed: "
                                       f"{error}") from error

            if not self.use_ninja:
                for name, flags in capabilities.items():
                    ext.extra_objects = (list(ext.extra_objects or [])
                                         + compile_capability(name, flags))
                super().build_extension(ext)
                return

            link = self.compiler.link_shared_object
            link_was_patched = "link_shared_object" in vars(self.compiler)
            with concurrent.futures.ThreadPoolExecutor(len(capabilities)) as pool:
                compiles = [pool.submit(compile_capability, name, flags)
                            for name, flags in capabilities.items()]

                def link_with_kernels(objects, *args, **kwargs):
                    kernels = [o for done in compiles for o in done.result()]
                    return link(list(objects) + kernels, *args, **kwargs)

                self.compiler.link_shared_object = link_with_kernels
                try:
                    super().build_extension(ext)
                except BaseException:
                    # The extension's own error is the one to report: let the kernel compiles
                    # finish (the pool waits for them) without raising theirs over it.
                    for done in compiles:
                        done.cancel()
                    raise
                finally:
                    if link_was_patched:
                        self.compiler.link_shared_object = link
                    else:
                        del self.compiler.link_shared_object  # the class's method again
                for done in compiles:  # a compile that failed though nothing linked its objects
                    done.result()

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    packages=find_packages(include=["ether_kernels", "ether_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
