"""A real Google Cloud Storage emulator on 127.0.0.1 for the gs:// tests: the `gcp-storage-emulator`
package from PyPI, in memory, in its own process.

`python tests/gcs_emulator.py PORT BUCKET` serves until killed; `Emulator(bucket)` starts and stops
that process and gives the environment that points every client we use at it:
  STORAGE_EMULATOR_HOST            gcsfs, hence etils.epath gs:// (and google-cloud-storage)
  TENSORSTORE_GCS_HTTP_URL         tensorstore's gcs driver, hence Orbax's array storage
  GOOGLE_AUTH_TOKEN_FOR_TESTING    tensorstore: a fixed token instead of looking for credentials
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record, hence tfds.data_source
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs: skip the bucket-layout probe, which needs real
                                   credentials (it would only warn and fall back)

One fix over the package as released (2026.7.19): media downloads also carry the
x-goog-generation and x-goog-metageneration headers that real GCS sends with every object read.
Without them tensorstore records generation 0 for a ranged read and refuses its next conditional
write of the same OCDBT manifest ("Malformed StorageGeneration": tensorstore's
IsValidStorageGeneration wants a generation > 0), so a second Orbax save in one process fails.
Not emulated, and so not tested here: ifGenerationMatch preconditions (the emulator ignores them;
Orbax gives each process its own OCDBT database, so one process writes each manifest).
"""
import os
import socket
import subprocess
import sys
import time


def _serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  plain_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']

  objects.download = download  # objects.get (?alt=media) calls it through the module
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is plain_download:
        handlers[method] = download
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).start()
  while True:
    time.sleep(3600)


def available() -> str:
  """'' when the emulator and the gs:// client (gcsfs) are installed, else why not."""
  import importlib.util
  missing = [p for p in ('gcp_storage_emulator', 'gcsfs') if importlib.util.find_spec(p) is None]
  return f'not installed: {", ".join(missing)} (pip install -e ".[test]")' if missing else ''


class Emulator:
  """The emulator process with one bucket; `env` points clients at it (see the module note)."""

  def __init__(self, bucket: str = 'tract-test'):
    self.bucket = bucket
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      self.port = s.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.env = {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
                'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
                'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
                'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
    self.process = None

  def __enter__(self):
    # Its request log (and the BrokenPipe tracebacks of requests that clients abandon) goes nowhere.
    self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port),
                                     self.bucket], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(('127.0.0.1', self.port), 0.2).close()
        return self
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.__exit__()
          raise RuntimeError(f'the GCS emulator did not start on port {self.port}')
        time.sleep(0.05)

  def __exit__(self, *exc):
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      self.process.wait(timeout=10)


if __name__ == '__main__':
  _serve(int(sys.argv[1]), sys.argv[2])
