"""ctms_media: the media core of a multipoint telepresence switch.

It forwards SRTP between rooms without decrypting it: verify the tag, strip the uplink tail
byte, rewrite the CSRC position, re-tag, and carry or re-wrap the EKT trailer.
"""

__version__ = "0.1.0"
