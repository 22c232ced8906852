"""Burned-in text risk: which instances are quarantined instead of released (the Clean Pixel Data option
is not implemented, so text in pixels can only be kept out, never cleaned).

Hand-written policy, because PS3.15 gives the criteria (E.3.1) but no library applies them: an instance is
released only when it says BurnedInAnnotation NO, or when it is of a kind not known for burned-in text and
does not say YES. Kinds at risk must also say RecognizableVisualFeatures NO.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# Ultrasound and the photographic / screen-capture modalities that routinely carry text in pixels.
AT_RISK_MODALITIES = frozenset({"US", "IVUS", "XC", "ES", "GM", "OT", "DOC"})
# Secondary Capture Image Storage SOP classes (PS3.4 B.5): screenshots, scanned and derived images.
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
# ImageType values (value 3 and on) that vendors use for screen captures.
SCREENSHOT_IMAGE_TYPES = frozenset({"SCREEN SAVE", "SCREENSHOT", "SECONDARY CAPTURE"})
# Conversion Type (0008,0064) values of captured or scanned images.
CAPTURED_CONVERSION_TYPES = frozenset({"WSD", "DV", "DI", "SD", "SI", "DF"})


def _code_string(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def assess_burned_in_risk(dataset: Dataset) -> str | None:
    """The reason to quarantine ``dataset`` for burned-in identifying text, or None when it may be released.

    Reasons name attributes and standard codes only, never a value that could identify anyone.
    """
    burned_in = _code_string(dataset, "BurnedInAnnotation")
    if burned_in == "YES":
        return "BurnedInAnnotation is YES"
    modality = _code_string(dataset, "Modality")
    sop_class = str(dataset.get("SOPClassUID", "")).strip()
    image_type = {str(value).strip().upper() for value in (dataset.get("ImageType") or [])}
    conversion = _code_string(dataset, "ConversionType")
    if modality in AT_RISK_MODALITIES:
        kind = f"modality {modality}"
    elif sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        kind = f"secondary capture SOP class {sop_class}"
    elif image_type & SCREENSHOT_IMAGE_TYPES:
        kind = "screen-capture ImageType"
    elif conversion in CAPTURED_CONVERSION_TYPES:
        kind = f"ConversionType {conversion}"
    else:
        return None
    if burned_in == "NO" and _code_string(dataset, "RecognizableVisualFeatures") == "NO":
        return None
    return (
        f"{kind} is at risk of burned-in text and is not verified clean "
        "(needs BurnedInAnnotation NO and RecognizableVisualFeatures NO)"
    )
