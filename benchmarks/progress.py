"""Progress bars: tqdm where installed, a silent stand-in otherwise."""

from __future__ import annotations


class _NoBar:
    """Stands in for tqdm where it is not installed (the test extra lacks it)."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass


def progress_bar(total: int, unit: str, disable: bool = False):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit=unit, disable=disable, dynamic_ncols=True, mininterval=0.5)
