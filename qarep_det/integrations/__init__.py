"""Deprecated import paths of earlier releases (see each module); nothing new lives here."""
