"""`nas report`: figures, CSV and a markdown summary from search, ptq and qat run folders."""
