"""msrcnn-jax: Mask Scoring R-CNN in JAX/Flax, parity-checked against mmdetection 2.x."""

from setuptools import find_packages, setup

setup(
    name='msrcnn-jax',
    version='0.1.0',
    description='Mask Scoring R-CNN in JAX/Flax with mmdetection checkpoint parity',
    packages=find_packages(include=['msrcnn_jax', 'msrcnn_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.4.30',
        'flax>=0.8',
        'optax>=0.2',
        'orbax-checkpoint>=0.6',
        'numpy>=1.24',
        'pycocotools>=2.0.7',
        'ml_collections>=0.1.1',
        'opencv-python-headless>=4.8',
        'absl-py>=1.4',
        'tqdm>=4.60',
        'tensorboardX>=2.6',
        'matplotlib>=3.7',
        'Pillow>=10',
        'scipy>=1.10',
        # jax.export's program serialization (python -m msrcnn_jax.export,
        # predict --exported); jax does not require it.
        'flatbuffers>=23.1',
    ],
    extras_require={
        # torch only reads mmdetection .pth files (CPU wheel is enough).
        'convert': ['torch>=2.0'],
        'tfds': ['tensorflow-cpu>=2.15', 'tensorflow-datasets>=4.9'],
        # The SavedModel that python -m msrcnn_jax.export also writes
        # (jax2tf); --nosaved-model needs no TensorFlow.
        'export': ['tensorflow-cpu>=2.15'],
        'test': ['pytest>=7', 'pytest-xdist>=3', 'chex>=0.1.85'],
        # Deviceless compilation for an H200 (benchmarks/aot.py
        # --target=gpu): XLA's CUDA compiler and ptxas, no driver, GPU or CUDA
        # libraries needed. Install it in a separate virtualenv: the plugin
        # prints its driver probe in every JAX process of a CPU-only machine.
        # Pinned to the JAX version the project is tested with. The tests
        # (tests/test_accelerator_compile.py) use the same packages in
        # build/accel instead, installed by .ci/run at the installed JAX.
        'accel': ['jax==0.10.2', 'jaxlib==0.10.2',
                  'jax-cuda12-plugin==0.10.2', 'jax-cuda12-pjrt==0.10.2',
                  'nvidia-cuda-nvcc-cu12==12.8.93'],
        # TPU topologies for benchmarks/aot.py --target=tpu (libtpu, ~700 MB).
        'tpu-aot': ['jax[tpu]==0.10.2'],
    },
)
