from setuptools import setup

setup(
    name="splitmed",
    version="0.1.0",
    description="Federated learning, split learning and SplitFed on DenseNet-121 for tuberculosis chest X-rays, "
                "with every byte and FLOP counted",
    py_modules=["densenet_split", "data", "common", "checkpoints", "fedlearn", "splitlearn", "splitfed", "distributed", "privacy", "report",
                "bench"],
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "pillow"],
    extras_require={"test": ["pytest", "scikit-learn", "opacus"], "plot": ["matplotlib"],
                    "dicom": ["pydicom>=3"]},
)
