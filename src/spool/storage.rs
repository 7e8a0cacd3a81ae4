//! The few file-system operations the spool needs, behind a trait: the real implementation is
//! a thin layer over `std::fs` in one directory; the simulation tests put a faulty, power-cut
//! model of Linux behind the same trait (`sim.rs`). Names are relative to the spool directory;
//! `dead-letter/…` is the only sub-directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// The spool directory.
pub trait Storage: Send + Sync {
    /// Names of the regular files directly in the sub-directory `sub` ("" for the spool
    /// directory itself); `NotFound` when there is no such sub-directory.
    fn list_in(&self, sub: &str) -> io::Result<Vec<String>>;
    /// Names of the regular files directly in the directory.
    fn list(&self) -> io::Result<Vec<String>> {
        self.list_in("")
    }
    /// Names of the sub-directories directly in the directory.
    fn list_dirs(&self) -> io::Result<Vec<String>>;
    /// Opens `name` for reading and writing, creating it (empty) if `create` and missing. Never
    /// truncates.
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn StorageFile>>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to` if it exists (atomically, as `rename(2)`); the
    /// new name is durable once the directory is synced.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes the directory entries below `sub` ("" for the spool directory itself) durable.
    fn sync_dir(&self, sub: &str) -> io::Result<()>;
    /// Creates the sub-directory `sub` if it is missing.
    fn create_dir(&self, sub: &str) -> io::Result<()>;
}

/// One open file.
#[allow(clippy::len_without_is_empty)] // a file's length is what the spool asks for
pub trait StorageFile: Send {
    fn len(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, or fails (possibly having written a prefix).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: the written bytes are durable once this returns `Ok`.
    fn sync(&self) -> io::Result<()>;
    fn try_clone(&self) -> io::Result<Box<dyn StorageFile>>;
}

/// The real directory.
pub struct Disk {
    pub dir: PathBuf,
}

impl Storage for Disk {
    fn list_in(&self, sub: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.dir.join(sub))? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Ok(name) = entry.file_name().into_string()
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn list_dirs(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir()
                && let Ok(name) = entry.file_name().into_string()
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.dir.join(name))?;
        Ok(Box::new(DiskFile(file)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn sync_dir(&self, sub: &str) -> io::Result<()> {
        File::open(self.dir.join(sub))?.sync_all()
    }

    fn create_dir(&self, sub: &str) -> io::Result<()> {
        fs::create_dir_all(self.dir.join(sub))
    }
}

struct DiskFile(File);

impl StorageFile for DiskFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn try_clone(&self) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(DiskFile(self.0.try_clone()?)))
    }
}
