package natsconf_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// ca is a throwaway certificate authority whose files live in a test's
// temporary directory.
type ca struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	dir     string
	name    string
	CertPEM string // path of the CA certificate
}

// leaf is a certificate and its key, as files.
type leaf struct{ Cert, Key string }

func newCA(t *testing.T, dir, name string) *ca {
	t.Helper()
	cert, der, key := create(t, &x509.Certificate{
		Subject:               pkix.Name{CommonName: name},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil, nil)
	c := &ca{cert: cert, key: key, dir: dir, name: name, CertPEM: filepath.Join(dir, name+"-ca.pem")}
	writePEM(t, c.CertPEM, "CERTIFICATE", der)
	return c
}

// issue signs a certificate for cn, valid for 127.0.0.1 and localhost, with
// the given extended key usages.
func (c *ca) issue(t *testing.T, cn string, usage ...x509.ExtKeyUsage) leaf {
	t.Helper()
	_, der, key := create(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: usage,
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}, c.cert, c.key)
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	l := leaf{Cert: filepath.Join(c.dir, c.name+"-"+cn+".pem"), Key: filepath.Join(c.dir, c.name+"-"+cn+"-key.pem")}
	writePEM(t, l.Cert, "CERTIFICATE", der)
	writePEM(t, l.Key, "EC PRIVATE KEY", kder)
	return l
}

// create makes a key and a certificate from tmpl valid for a day, signed by
// parent (self-signed when parent is nil).
func create(t *testing.T, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, []byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, der, key
}

func serial(t *testing.T) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
