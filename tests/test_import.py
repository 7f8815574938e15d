import subprocess
import sys

def test_import_nas_and_its_parser_load_no_torch_ray_or_optuna():
    code = ("import sys, nas, nas.cli\n"
            "nas.cli.build_parser()\n"
            "print(','.join(m for m in ('torch', 'triton', 'numpy', 'ray', 'optuna')\n"
            "               if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_nas_modules_loads_no_triton():
    code = ("import sys, nas, nas.cli, nas.spaces, nas.models, nas.data, nas.train, nas.runs\n"
            "import nas.plan, nas.cost, nas.quant, nas.quant.ptq, nas.kernels, nas.bench.ptq\n"
            "nas.cli.build_parser()\n"
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lazy_public_names():
    import nas

    assert nas.load_space("fmnist_resnet8").name == "fmnist_resnet8"
    assert "resnet20" in nas.list_models()
    assert issubclass(nas.NasError, Exception)
