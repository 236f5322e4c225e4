"""Certification of datasets (``certify``) and of VNN-LIB properties (``verify``)."""
