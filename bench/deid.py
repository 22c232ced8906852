"""De-identification throughput: Enclave vs dicognito vs dicom-anonymizer vs a plain pydicom read-and-write.

Run: ``uv run --package enclave-deid --group bench python bench/deid.py [--copies 500] [--repeat 3]``
(the ``bench`` dependency group of services/deid holds the two peers). Each method turns the same
in-memory Part 10 files (``--copies`` copies of pydicom's MR_small and CT_small, each with distinct UIDs)
into de-identified Part 10 bytes: parse, de-identify, write. The floor parses and writes without
changing anything. Runs are interleaved and the best of ``--repeat`` is kept, so all methods see the
same machine load. Targets: Enclave >= 2x dicognito and >= the read-and-write floor.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from io import BytesIO

from dicognito.anonymizer import Anonymizer
from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions_2024b
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from enclave_deid.pseudonym_keys import DeidPseudonymKeys
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

KEY = b"bench-pseudonymisation-key-32-bytes!!"


def copies(name: str, count: int) -> list[bytes]:
    """``count`` Part 10 files of a pydicom test file, each with its own study, series and instance UIDs."""
    template = dcmread(get_testdata_file(name))
    files = []
    for _ in range(count):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = BytesIO()
        dcmwrite(buffer, template, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def _pydicom_write(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def floor(data: bytes) -> bytes:
    """Plain pydicom: ``dcmread`` then ``dcmwrite`` as a Part 10 file, nothing changed."""
    return _pydicom_write(dcmread(BytesIO(data)))


def enclave(policy: DeidPolicy) -> Callable[[bytes], bytes]:
    keys, context = DeidPseudonymKeys(KEY), DeidContext("bench-tenant")

    def run(data: bytes) -> bytes:
        return write_instance(deidentify(read_instance(data), policy, keys, context).dataset, data)

    return run


def dicognito(data: bytes) -> bytes:
    """The peers read and write with plain pydicom, as their own command-line tools do."""
    dataset = dcmread(BytesIO(data))
    Anonymizer().anonymize(dataset)
    return _pydicom_write(dataset)


def dicom_anonymizer(data: bytes) -> bytes:
    dataset = dcmread(BytesIO(data))
    anonymize_dataset(dataset, base_rules_gen=initialize_actions_2024b)
    return _pydicom_write(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    methods: dict[str, Callable[[bytes], bytes]] = {
        "pydicom read+write (floor)": floor,
        "enclave basic profile": enclave(DeidPolicy()),
        "enclave service default": enclave(DeidPolicy(retain_longitudinal_modified_dates=True)),
        "enclave all options": enclave(
            DeidPolicy(
                retain_longitudinal_modified_dates=True,
                retain_patient_characteristics=True,
                retain_device_identity=True,
                clean_descriptors=True,
            )
        ),
        "dicognito 0.19.0": dicognito,
        "dicom-anonymizer 2.1.0": dicom_anonymizer,
    }
    results: dict[str, dict[str, float]] = {}
    for name in ("MR_small.dcm", "CT_small.dcm"):
        files = copies(name, args.copies)
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(args.repeat):
            for label, method in methods.items():
                start = time.perf_counter()
                for data in files:
                    method(data)
                best[label] = min(best[label], time.perf_counter() - start)
        results[name] = {label: len(files) / seconds for label, seconds in best.items()}
    print(f"files/s, best of {args.repeat} interleaved runs over {args.copies} copies with distinct UIDs")
    print(f"{'method':<30}" + "".join(f"{name:>16}" for name in results))
    for label in methods:
        print(f"{label:<30}" + "".join(f"{results[name][label]:>16.0f}" for name in results))
    for name, rates in results.items():
        for label in ("enclave basic profile", "enclave service default"):
            ours = rates[label]
            print(
                f"{name}, {label.removeprefix('enclave ')}: "
                f"enclave/dicognito = {ours / rates['dicognito 0.19.0']:.2f}x (target >= 2), "
                f"enclave/floor = {ours / rates['pydicom read+write (floor)']:.2f}x (target >= 1)"
            )


if __name__ == "__main__":
    main()
