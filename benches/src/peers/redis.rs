//! Redis as a peer: a `redis-server` child process on a free loopback port
//! (`--bind 127.0.0.1 --save '' --appendonly no`), driven by one connection
//! per client with SET / GET of binary values, `batch` commands pipelined
//! per call.
//!
//! The client is a minimal hand-written RESP2 speaker (SET, GET, PING,
//! FLUSHALL, SHUTDOWN) rather than the `redis` crate: the crate brings a
//! large dependency tree (connection managers, cluster, script, URL
//! parsing) for four commands, and its value type copies bulk replies into a
//! `Vec` we would copy again. Here a bulk reply is read once into the
//! `Bytes` the benchmark checks, and a SET's value is written straight from
//! the payload buffer, so the client adds no copy a production client
//! would not.

use super::workload::{BatchStore, Cell};
use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use std::net::TcpListener;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A reply header: the first line of a RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:n`
    Int(i64),
    /// `$n` (`None` for `$-1`, the nil reply).
    Bulk(Option<usize>),
}

/// Parses one reply header line (with or without its CRLF).
fn parse_header(line: &[u8]) -> anyhow::Result<Header> {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let (&kind, rest) = line.split_first().context("empty reply line")?;
    let text = std::str::from_utf8(rest).context("reply line is not UTF-8")?;
    Ok(match kind {
        b'+' => Header::Simple(text.to_string()),
        b'-' => Header::Error(text.to_string()),
        b':' => Header::Int(text.parse().with_context(|| format!("bad integer reply {text:?}"))?),
        b'$' => match text.parse::<i64>() {
            Ok(-1) => Header::Bulk(None),
            Ok(n) if n >= 0 => Header::Bulk(Some(n as usize)),
            _ => bail!("bad bulk length {text:?}"),
        },
        other => bail!("unsupported reply type {:?}", other as char),
    })
}

/// The RESP array header and bulk-string headers of a command whose last
/// argument (of `last_len` bytes) is sent separately, followed by CRLF.
fn command_head(args: &[&[u8]], last_len: Option<usize>) -> Vec<u8> {
    let n = args.len() + usize::from(last_len.is_some());
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(format!("*{n}\r\n").as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = last_len {
        out.extend_from_slice(format!("${len}\r\n").as_bytes());
    }
    out
}

/// One RESP2 connection.
#[derive(Debug)]
struct Resp<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    line: Vec<u8>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Resp<R, W> {
    fn new(r: R, w: W) -> Self {
        Resp {
            r: BufReader::with_capacity(256 << 10, r),
            w: BufWriter::with_capacity(64 << 10, w),
            line: Vec::with_capacity(64),
        }
    }

    /// Queues a command (sent at the next flush).
    async fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.w.write_all(&command_head(args, None)).await?;
        Ok(())
    }

    /// Queues `SET key value`; the value is written from its own buffer
    /// (BufWriter passes writes larger than its buffer straight through).
    async fn send_set(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.w
            .write_all(&command_head(&[b"SET", key], Some(value.len())))
            .await?;
        self.w.write_all(value).await?;
        self.w.write_all(b"\r\n").await?;
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.w.flush().await?;
        Ok(())
    }

    async fn header(&mut self) -> anyhow::Result<Header> {
        self.line.clear();
        let n = self.r.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        match parse_header(&self.line)? {
            Header::Error(e) => Err(anyhow!("server error: {e}")),
            h => Ok(h),
        }
    }

    /// Reads a `+` reply.
    async fn simple(&mut self) -> anyhow::Result<String> {
        match self.header().await? {
            Header::Simple(s) => Ok(s),
            h => bail!("expected a simple string, got {h:?}"),
        }
    }

    /// Reads a bulk reply into one buffer (no zero-fill, no second copy).
    async fn bulk(&mut self) -> anyhow::Result<Option<Bytes>> {
        let len = match self.header().await? {
            Header::Bulk(None) => return Ok(None),
            Header::Bulk(Some(n)) => n,
            h => bail!("expected a bulk string, got {h:?}"),
        };
        let mut buf = BytesMut::with_capacity(len + 2);
        while buf.len() < len + 2 {
            let want = len + 2 - buf.len();
            if (&mut self.r).take(want as u64).read_buf(&mut buf).await? == 0 {
                bail!("connection closed in a bulk reply");
            }
        }
        if &buf[len..] != b"\r\n" {
            bail!("bulk reply not terminated by CRLF");
        }
        buf.truncate(len);
        Ok(Some(buf.freeze()))
    }
}

type TcpResp = Resp<OwnedReadHalf, OwnedWriteHalf>;

async fn connect(port: u16) -> anyhow::Result<TcpResp> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    Ok(Resp::new(r, w))
}

/// A `redis-server` child process; stopped (SHUTDOWN NOSAVE, then killed
/// if need be) when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    child: Option<Child>,
    port: u16,
    version: String,
}

impl Server {
    /// Starts `bin` on a free loopback port, working directory `dir`, log in
    /// `dir/redis.log`; waits until it answers PING (10 s at most).
    pub(crate) fn start(bin: &Path, dir: &Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<Server> {
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .with_context(|| format!("running {} --version", bin.display()))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Server {
            child: Some(child),
            port,
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = rt.block_on(async {
                let mut c = connect(port).await?;
                c.send(&[b"PING"]).await?;
                c.flush().await?;
                c.simple().await
            });
            match ping {
                Ok(s) if s == "PONG" => return Ok(server),
                _ if Instant::now() > deadline => {
                    let tail = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                    bail!(
                        "redis-server did not answer PING on port {port} within 10 s: {}",
                        tail.lines().last().unwrap_or("no log")
                    );
                }
                _ => {}
            }
            if let Some(Some(status)) = server.child.as_mut().map(|c| c.try_wait()).transpose()? {
                let tail = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                server.child = None;
                bail!(
                    "redis-server exited ({status}): {}",
                    tail.lines().last().unwrap_or("no log")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What `redis-server --version` said.
    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    /// Opens `clients` connections.
    pub(crate) async fn store(&self, clients: usize) -> anyhow::Result<RedisStore> {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(tokio::sync::Mutex::new(connect(self.port).await?));
        }
        Ok(RedisStore { conns })
    }

    /// Deletes every key (between cells, untimed).
    pub(crate) async fn flush_all(&self) -> anyhow::Result<()> {
        let mut c = connect(self.port).await?;
        c.send(&[b"FLUSHALL"]).await?;
        c.flush().await?;
        c.simple().await?;
        Ok(())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SHUTDOWN NOSAVE over a blocking socket (no runtime needed here).
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            use std::io::Write;
            let _ = s.write_all(&command_head(&[b"SHUTDOWN", b"NOSAVE"], None));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One connection per client (each used by its client only; the mutex is
/// never contended).
#[derive(Debug)]
pub(crate) struct RedisStore {
    conns: Vec<tokio::sync::Mutex<TcpResp>>,
}

impl BatchStore for RedisStore {
    async fn put_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<()> {
        let mut c = self.conns[client].lock().await;
        for k in keys.clone() {
            c.send_set(&cell.key(client, k), &cell.payload(client, k).bytes).await?;
        }
        c.flush().await?;
        for k in keys {
            let r = c.simple().await.with_context(|| format!("SET of key {k}"))?;
            if r != "OK" {
                bail!("SET of key {k} answered {r}");
            }
        }
        Ok(())
    }

    async fn get_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<Vec<Bytes>> {
        let mut c = self.conns[client].lock().await;
        for k in keys.clone() {
            c.send(&[b"GET", &cell.key(client, k)]).await?;
        }
        c.flush().await?;
        let mut out = Vec::with_capacity((keys.end - keys.start) as usize);
        for k in keys {
            out.push(c.bulk().await?.with_context(|| format!("key {k} is missing"))?);
        }
        Ok(out)
    }
}

/// Where `redis-server` is: on PATH, or None.
pub(crate) fn which() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_and_parses_headers() {
        assert_eq!(command_head(&[b"GET", b"k1"], None), b"*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n");
        assert_eq!(
            command_head(&[b"SET", b"k"], Some(5)),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\n"
        );
        assert_eq!(parse_header(b"+OK\r\n").unwrap(), Header::Simple("OK".into()));
        assert_eq!(parse_header(b"-ERR bad\r\n").unwrap(), Header::Error("ERR bad".into()));
        assert_eq!(parse_header(b":42\r\n").unwrap(), Header::Int(42));
        assert_eq!(parse_header(b"$-1\r\n").unwrap(), Header::Bulk(None));
        assert_eq!(parse_header(b"$5\r\n").unwrap(), Header::Bulk(Some(5)));
        for bad in [&b""[..], b"$-2\r\n", b"$x\r\n", b"*2\r\n"] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn pipelines_over_a_stream() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(client);
        let mut c = Resp::new(r, w);
        let value = vec![7u8; 100_000];
        c.send_set(b"k", &value).await.unwrap();
        c.send(&[b"GET", b"k"]).await.unwrap();
        c.send(&[b"GET", b"nope"]).await.unwrap();
        c.send(&[b"GET", b"x"]).await.unwrap();
        c.flush().await.unwrap();
        // The "server": read the whole request, then answer.
        let gets: usize = [&b"k"[..], b"nope", b"x"]
            .iter()
            .map(|k| command_head(&[b"GET", k], None).len())
            .sum();
        let want_len = command_head(&[b"SET", b"k"], Some(value.len())).len() + value.len() + 2 + gets;
        let mut req = vec![0u8; want_len];
        server.read_exact(&mut req).await.unwrap();
        assert!(req.starts_with(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n"));
        assert!(req.ends_with(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n"));
        let mut reply = b"+OK\r\n$100000\r\n".to_vec();
        reply.extend_from_slice(&value);
        reply.extend_from_slice(b"\r\n$-1\r\n-ERR oops\r\n");
        server.write_all(&reply).await.unwrap();
        assert_eq!(c.simple().await.unwrap(), "OK");
        assert_eq!(c.bulk().await.unwrap().unwrap(), Bytes::from(value));
        assert_eq!(c.bulk().await.unwrap(), None);
        assert!(format!("{:#}", c.bulk().await.unwrap_err()).contains("ERR oops"));
    }
}
