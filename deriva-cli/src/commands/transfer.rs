//! `put` and `get`: a file sent whole or streamed, an answer written to a temporary file and
//! renamed into place, and their progress on a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deriva_core::CAddr;
use deriva_proto::{GetRequest, GetResponse, PutLeafRequest, addr_bytes};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    PROGRESS_THRESHOLD_BYTES, PUT_CHUNK_BYTES, STREAM_PUT_THRESHOLD_BYTES, answered_addr, emit,
    short,
};
use crate::client::{CliError, Target, connect};

pub(super) async fn put(server: &Target, file: &Path) -> Result<(), CliError> {
    let stdin = file == Path::new("-");
    let context = if stdin {
        "put stdin".to_owned()
    } else {
        format!("put {}", file.display())
    };
    // Open before connecting, so a missing file is reported as such whatever the server.
    let (mut source, total): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = if stdin {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let opened = tokio::fs::File::open(file)
            .await
            .map_err(|e| CliError::io(&context, e))?;
        let len = opened.metadata().await.ok().map(|m| m.len());
        (Box::new(opened), len)
    };
    let mut client = connect(server).await?;
    // Up to the threshold, one PutLeaf (which any Deriva server answers); beyond it, the bytes
    // stream in chunks and only a chunk or two is held at a time.
    let mut head = Vec::new();
    (&mut source)
        .take(STREAM_PUT_THRESHOLD_BYTES + 1)
        .read_to_end(&mut head)
        .await
        .map_err(|e| CliError::io(&context, e))?;
    let answer = if head.len() as u64 <= STREAM_PUT_THRESHOLD_BYTES {
        client
            .put_leaf(PutLeafRequest {
                data: Bytes::from(head),
            })
            .await
            .map_err(|s| CliError::rpc(&context, s))?
            .into_inner()
    } else {
        put_streamed(&mut client, &context, Bytes::from(head), source, total).await?
    };
    let addr = answered_addr(&context, &answer.addr)?;
    emit(&format!("{addr}\n"))
}

/// `put` of more than [`STREAM_PUT_THRESHOLD_BYTES`]: `PutLeafStream` of `head` and then the
/// rest of `source`, in chunks of [`PUT_CHUNK_BYTES`], with a progress bar on a terminal. A
/// read error cancels the call, so the server stores nothing.
async fn put_streamed(
    client: &mut crate::client::Client,
    context: &str,
    head: Bytes,
    source: Box<dyn AsyncRead + Unpin + Send>,
    total: Option<u64>,
) -> Result<deriva_proto::PutLeafResponse, CliError> {
    let progress = UploadProgress::new(total);
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
    struct Reading {
        head: Option<Bytes>,
        source: Box<dyn AsyncRead + Unpin + Send>,
        failed: Option<tokio::sync::oneshot::Sender<std::io::Error>>,
        sent: u64,
        progress: UploadProgress,
    }
    let reading = Reading {
        head: Some(head),
        source,
        failed: Some(failed_tx),
        sent: 0,
        progress: progress.clone(),
    };
    let chunks = futures::stream::unfold(reading, |mut r| async move {
        let chunk = match r.head.take() {
            // What was read to choose the call goes first, in chunks like the rest.
            Some(mut head) if !head.is_empty() => {
                let chunk = head.split_to(head.len().min(PUT_CHUNK_BYTES));
                r.head = Some(head);
                chunk
            }
            _ => {
                let mut buf = Vec::with_capacity(PUT_CHUNK_BYTES);
                match (&mut r.source)
                    .take(PUT_CHUNK_BYTES as u64)
                    .read_to_end(&mut buf)
                    .await
                {
                    Ok(0) => return None,
                    Ok(_) => Bytes::from(buf),
                    Err(e) => {
                        // Never end the stream cleanly after a failed read: the caller
                        // cancels the call instead.
                        if let Some(tx) = r.failed.take() {
                            let _ = tx.send(e);
                        }
                        futures::future::pending::<()>().await;
                        return None;
                    }
                }
            }
        };
        r.sent += chunk.len() as u64;
        r.progress.update(r.sent);
        Some((deriva_proto::PutLeafStreamRequest { chunk }, r))
    });
    let call = client.put_leaf_stream(chunks);
    let answer = tokio::select! {
        answer = call => answer
            .map(tonic::Response::into_inner)
            .map_err(|s| CliError::rpc(context, s)),
        Ok(e) = failed_rx => Err(CliError::io(context, e)),
    };
    progress.finish();
    answer
}

pub(super) async fn get(
    server: &Target,
    addr: CAddr,
    output: Option<&Path>,
) -> Result<(), CliError> {
    let context = format!("get {}", short(&addr));
    let output = output.filter(|p| *p != Path::new("-"));
    // Create the temporary file before connecting, so an unwritable directory fails before the
    // server computes anything.
    let mut temp = match output {
        Some(path) => Some(TempOutput::create(&context, path).await?),
        None => None,
    };
    let mut stream = connect(server)
        .await?
        .get(GetRequest {
            addr: addr_bytes(&addr),
        })
        .await
        .map_err(|s| CliError::rpc(&context, s))?
        .into_inner();
    match temp.as_mut() {
        None => {
            let mut stdout = tokio::io::stdout();
            match copy_chunks(&mut stream, &mut stdout).await {
                Ok(_) => Ok(()),
                Err(CopyError::Rpc(s)) => Err(CliError::rpc(&context, s)),
                // The reader went away (`deriva get X | head`): stop quietly.
                Err(CopyError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(CopyError::Write(e)) => Err(CliError::io(
                    format!("{context}: cannot write to stdout"),
                    e,
                )),
            }
        }
        Some(temp) => {
            match copy_chunks(&mut stream, &mut temp.file).await {
                Ok(_) => {}
                Err(CopyError::Rpc(s)) => return Err(CliError::rpc(&context, s)),
                Err(CopyError::Write(e)) => {
                    return Err(CliError::io(
                        format!("{context}: cannot write to {}", temp.path.display()),
                        e,
                    ));
                }
            }
            temp.persist()
                .await
                .map_err(|e| CliError::io(context.clone(), e))
        }
    }
}

enum CopyError {
    Rpc(tonic::Status),
    Write(std::io::Error),
}

/// Writes each chunk as it arrives, with a progress counter once it is worth one. Returns the
/// byte count.
async fn copy_chunks<W: AsyncWrite + Unpin>(
    stream: &mut tonic::Streaming<GetResponse>,
    out: &mut W,
) -> Result<u64, CopyError> {
    let mut progress = Progress::new();
    let mut total = 0u64;
    while let Some(message) = stream.message().await.map_err(CopyError::Rpc)? {
        out.write_all(&message.chunk)
            .await
            .map_err(CopyError::Write)?;
        total += message.chunk.len() as u64;
        progress.update(total);
    }
    out.flush().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// A bytes-received spinner on stderr, shown only when stderr is a terminal and the transfer
/// has passed [`PROGRESS_THRESHOLD_BYTES`] (`Get` has no total size up front). Cleared when
/// dropped.
struct Progress {
    /// Counting hidden from the first byte, so the rate is right once it shows.
    bar: Option<ProgressBar>,
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bytes} received ({binary_bytes_per_sec}, {elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        });
        Self { bar, shown: false }
    }

    fn update(&mut self, received: u64) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(received);
        if !self.shown && received > PROGRESS_THRESHOLD_BYTES {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(100));
            self.shown = true;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The progress bar of a streamed `put` on stderr, when it is a terminal: bytes sent of the
/// file's size (a counter for stdin). Cheap to clone; the clones share the bar.
#[derive(Clone)]
struct UploadProgress(Option<ProgressBar>);

impl UploadProgress {
    fn new(total: Option<u64>) -> Self {
        Self(std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total {
                Some(len) => (
                    ProgressBar::new(len),
                    "{bar:30} {bytes}/{total_bytes} sent ({binary_bytes_per_sec}, {eta} left)",
                ),
                None => (
                    ProgressBar::no_length(),
                    "{spinner} {bytes} sent ({binary_bytes_per_sec}, {elapsed})",
                ),
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        }))
    }

    fn update(&self, sent: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(sent);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// A temporary file next to the `-o` destination; removed when dropped unless
/// [`TempOutput::persist`] renamed it into place. A destination that exists and is not a regular
/// file (a device, a pipe) is written directly instead, and `persisted` from the start.
struct TempOutput {
    file: tokio::fs::File,
    path: PathBuf,
    dest: PathBuf,
    persisted: bool,
}

impl TempOutput {
    async fn create(context: &str, dest: &Path) -> Result<Self, CliError> {
        let existing = tokio::fs::metadata(dest).await.ok();
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(CliError::Usage(format!(
                "-o {}: is a directory",
                dest.display()
            )));
        }
        // A device, a pipe or a socket (`-o /dev/null`, `-o /dev/stdout`, a FIFO) takes the
        // bytes as they come: renaming a file over it would replace it (as root, /dev/null
        // itself) instead of writing to it.
        if existing.is_some_and(|m| !m.is_file()) {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(dest)
                .await
                .map_err(|e| {
                    CliError::io(format!("{context}: cannot open {}", dest.display()), e)
                })?;
            return Ok(Self {
                file,
                path: dest.to_owned(),
                dest: dest.to_owned(),
                persisted: true,
            });
        }
        let name = dest
            .file_name()
            .ok_or_else(|| CliError::Usage(format!("-o {}: not a file name", dest.display())))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut attempt = 0u32;
        loop {
            let path = dir.join(format!(
                ".{}.{}-{}.deriva-tmp",
                name.to_string_lossy(),
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        path,
                        dest: dest.to_owned(),
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(CliError::io(
                        format!(
                            "{context}: cannot create a temporary file in {}",
                            dir.display()
                        ),
                        e,
                    ));
                }
            }
        }
    }

    /// Flushes the file to disk and renames it to the destination (a destination that is not a
    /// regular file was written in place: nothing to do).
    async fn persist(&mut self) -> std::io::Result<()> {
        if self.persisted {
            return Ok(());
        }
        self.file.sync_all().await?;
        tokio::fs::rename(&self.path, &self.dest)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot rename {} to {}: {e}",
                        self.path.display(),
                        self.dest.display()
                    ),
                )
            })?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
