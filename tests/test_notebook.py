"""notebooks/tract_jax_demo.ipynb: valid nbformat 4 (default tier), and runs top to bottom
(nbclient + ipykernel) from inside the checkout at the QUICK budget on the tests' tiny job (slow tier;
TRACT_NOTEBOOK_CONFIG points it at tests/tiny_job.py, whose compiled steps the session already has)."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'tract_jax_demo.ipynb')

nbformat = pytest.importorskip(
    'nbformat', reason='the notebook tests need nbformat (pip install nbformat nbclient ipykernel)')


def _cells(kind='code'):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return [c for c in nb.cells if c.cell_type == kind]


def test_notebook_is_valid_nbformat4():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == 'python3'
  assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'commit it clean'
  first = _cells()[0].source
  assert 'TRACT_NOTEBOOK_QUICK' in first
  # No placeholder URL: the install cell finds the user's own checkout or explains how to clone it.
  assert not any('YOUR_ORG' in c.source or 'REPO_URL' in c.source for c in nb.cells)


@pytest.mark.slow
def test_notebook_runs_quick(tmp_path, monkeypatch):
  nbclient = pytest.importorskip(
      'nbclient', reason='executing the notebook needs nbclient (pip install nbclient ipykernel)')
  pytest.importorskip('ipykernel', reason='executing the notebook needs ipykernel '
                      '(pip install ipykernel)')
  workdir = tmp_path / 'demo'
  # The kernel is a child process: it inherits these.
  monkeypatch.setenv('TRACT_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('TRACT_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('TRACT_NOTEBOOK_CONFIG', 'tests/tiny_job.py')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError with the cell's traceback on any failure

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  # Run from inside the checkout: the installed package and the repository's configs.
  assert 'QUICK=True' in text and 'Using the installed tract_jax' in text
  assert 'tests/tiny_job.py from' in text
  assert 'TRACT student' in text and 'undistilled teacher' in text
  html = [o['data']['text/html'] for o in outputs
          if o.output_type == 'display_data' and 'text/html' in o.get('data', {})]
  assert html and html[0].count('data:image/png;base64,') == 4  # teacher, 2 students, undistilled
  result = json.loads((workdir / 'result.json').read_text())
  assert result['student_steps'] == 1
  for name in ('teacher_16steps.png', 'phase0_student_4steps.png', 'phase1_student_1steps.png',
               'teacher_1steps.png'):
    assert (workdir / name).exists(), name
