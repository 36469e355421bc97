"""The state on disk, its one owner: the versioned format (manifests, file names, the
contributor schema), cell files (HDF5), the ledger (SQLite), durable writes, migration.

May import: streamcoadd.core and streamcoadd.io; only this layer imports h5py or sqlite3.
"""
